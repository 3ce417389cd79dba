"""Names that live outside the code: in Dagster instances (assets, checks, jobs, sensors, schedules,
partitions, cursors, run tags) and in the stored files (parquet footer keys).

Changing one of them breaks what existing instances and stores hold: materialisation history, sensor
cursors, run filters by tag, the footers of files already written. Add names; rename only with a
migration. The folder names of the store live with the layout, in `pipeline/storage.py`. This module
imports nothing, so every layer may use it.
"""

# Assets
CRAWL_METADATA_ASSET = "crawl_metadata"
DOWNLOADED_IMAGES_ASSET = "downloaded_images"
CLIP_EMBEDDINGS_ASSET = "clip_embeddings"
QUALITY_SCORES_ASSET = "quality_scores"
FILTERED_PAIRS_ASSET = "filtered_pairs"
RECAPTIONS_ASSET = "recaptions"
CATALOG_ASSET = "catalog"
DATASET_CARD_ASSET = "dataset_card"
SEARCH_INDEX_ASSET = "search_index"
BLOCKLIST_ASSET = "blocklist"  # the block lists' active entries
TAKEDOWNS_ASSET = "takedowns"  # the removal of what the lists match, and its ledger
DUPLICATES_ASSET = "duplicates"  # dataset-level dedup, its finds removed
TRAINING_SHARDS_ASSET = "training_shards"  # named subsets resharded for training (exports/)

# Asset checks (the asset each one checks is in its name's comment)
ONE_ROW_PER_CRAWL_ROW_CHECK = "one_row_per_crawl_row"  # downloaded_images
KEYS_ARE_SUCCESS_IMAGES_CHECK = "keys_are_success_images"  # clip_embeddings
ONE_ROW_PER_EMBEDDING_CHECK = "one_row_per_embedding"  # quality_scores
FOLLOWS_THE_CONTRACT_CHECK = "follows_the_contract"  # filtered_pairs
ONE_ROW_PER_KEPT_PAIR_CHECK = "one_row_per_kept_pair"  # recaptions

# The code location: the module whose `defs` the UI, the daemon and `dg` load, and the location name they
# load it under (workspace.yaml, deploy/workspace.yaml, [tool.dg.project], the demo's workspace). Runs
# of `laion-assets run` record it, so the UI re-executes them through that location.
DEFINITIONS_MODULE = "laion_assets.definitions"
CODE_LOCATION = "laion_assets"

# Jobs, partitions, sensors, schedules and the concurrency pool
SHARD_JOB = "shard_pipeline"
SHARDS_PARTITIONS = "shards"  # DynamicPartitionsDefinition: one partition per file in incoming/
INCOMING_FILES_SENSOR = "incoming_files_sensor"
# Its cursor: a JSON object, file name in incoming/ -> StoredFile.fingerprint of the content last seen.
FOLLOW_UPSTREAM_SENSOR = "follow_upstream_sensor"
CATCH_UP_SCHEDULE = "catch_up_schedule"
TAKEDOWN_JOB = "takedown"  # blocklist, takedowns, then the dataset-level assets
DATASET_JOB = "dataset_assets"  # the dataset-level assets; `laion-assets run` materialises them one a run
BLOCKLIST_SENSOR = "blocklist_sensor"
# Its cursor: a JSON object, file name in blocklist/ -> StoredFile.fingerprint of the content last seen.
GPU_POOL = "gpu"  # clip_embeddings, quality_scores, recaptions: one slot per GPU
DOWNLOAD_POOL = "download"  # downloaded_images: how many shards download at once
POOL_SLOTS_SENSOR = "pool_slots_sensor"  # hands a free pool slot to a step left waiting for it

# Run tags
SOURCE_FILE_TAG = "laion_assets/source_file"  # the incoming file of a sensor run; `first..last` for several
TRIGGER_TAG = "laion_assets/trigger"  # new | changed | catch-up | cli | blocklist
# Asset definition metadata: the store layer (folder) an asset writes its shard files into.
LAYER_METADATA = "laion_assets/layer"
# Asset definition metadata of a dataset-level asset: the store layers it reads, comma-separated. Its deps
# are the assets that must run before it, not every asset that wrote what it reads.
READS_METADATA = "laion_assets/reads"

# Parquet footer keys (file key-value metadata), each value a string
# JSON {"file", "fingerprint", "size", "sha256"}: the incoming content a per-shard file was made from (files
# written before size and sha256 were recorded have the first two)
SOURCE_FOOTER = "laion_assets.source"
# a per-shard file after the first layer: a digest of what the file it was made from records about itself
MADE_FROM_FOOTER = "laion_assets.made_from"
# images: a digest of the rows the layers after it read (lineage.content_footer), which a download again
# with the same settings changes only where the web answered otherwise
CONTENT_FOOTER = "laion_assets.content"
CLIP_MODEL_FOOTER = "laion_assets.clip_model"  # embeddings, search index: open_clip model name
CLIP_PRETRAINED_FOOTER = "laion_assets.clip_pretrained"  # the pretrained tag, checkpoint path or "none"
CLIP_WEIGHTS_FOOTER = "laion_assets.clip_weights"  # the weights: tag, sha256 or seed (clip.weights_id)
# crawl_metadata, images: JSON, the settings of their run config (CrawlSettings.recorded, DownloadSettings)
SETTINGS_FOOTER = "laion_assets.settings"
PAIRS_SETTINGS_FOOTER = "laion_assets.pairs_settings"  # JSON: the rules' settings (PairsSettings)
PAIRS_FUNNEL_FOOTER = "laion_assets.funnel"  # JSON {"rows_in": n, "removed": {rule: n}} in funnel order
DEDUP_SETTINGS_FOOTER = "laion_assets.dedup_settings"  # duplicates.parquet: JSON, DedupSettings
# JSON: an accepted change of the settings a removal used. duplicates.parquet: a list of {"at", "changes"};
# a ledger: the list of changes ("field: before -> after") its run accepted
SETTINGS_CHANGE_FOOTER = "laion_assets.settings_change"
SCORES_FOOTER = "laion_assets.scores"  # scores: JSON, the score settings and the weights of each score
SCORES_READ_FOOTER = "laion_assets.scores_read"  # pairs: what the scores file their rules read was
CAPTIONER_FOOTER = "laion_assets.captioner"  # recaptions: JSON, the captioner, its weights and decoding
# JSON {"shard", "source_file", "run_id", "materialized_at" (UTC ISO 8601), "code_version"}
PROVENANCE_FOOTER = "laion_assets.provenance"
# a removal's pending ledger: JSON {shard: [fingerprint, provenance]}, its shards' pairs files before it
PAIRS_READ_FOOTER = "laion_assets.pairs_read"
