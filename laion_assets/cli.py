"""The `laion-assets` command: run the per-shard assets from a shell or a script, or the demo."""

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import dagster as dg
import yaml

from laion_assets.definitions import DATASET_ASSETS
from laion_assets.defs.jobs import PER_SHARD_ASSETS
from laion_assets.defs.metadata import LAYER
from laion_assets.defs.partitions import shards
from laion_assets.defs.resources import build_resources
from laion_assets.pipeline import catalog as duckdb_catalog
from laion_assets.pipeline.clip import ClipSettings
from laion_assets.pipeline.sources import parse_source_name
from laion_assets.pipeline.storage import INCOMING, DatasetStore, root_from_env

ALL_ASSETS = [*PER_SHARD_ASSETS, *DATASET_ASSETS]  # per-shard assets, then the dataset-level ones
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the summary lines say enough


@dataclass
class ShardOutcome:
    shard: str
    ran: list[str] = field(default_factory=list)  # asset names materialised
    rows: dict[str, int] = field(default_factory=dict)
    error: str | None = None

    def line(self) -> str:
        if self.error:
            return f"{self.shard}: FAILED ({', '.join(self.ran)}): {self.error}"
        if not self.ran:
            return f"{self.shard}: up to date"
        return f"{self.shard}: " + ", ".join(f"{name} {self.rows.get(name, '?')} rows" for name in self.ran)


@contextmanager
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """The instance at $DAGSTER_HOME, or a temporary in-memory one."""
    if os.environ.get("DAGSTER_HOME"):
        with dg.DagsterInstance.get() as instance:
            yield instance
    else:
        yield dg.DagsterInstance.ephemeral()


def select_assets(names: list[str] | None) -> list[dg.AssetsDefinition]:
    by_name = {a.key.to_user_string(): a for a in ALL_ASSETS}
    if not names:
        return list(ALL_ASSETS)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"laion-assets: unknown assets {unknown}; choose from {list(by_name)}")
    return [by_name[n] for n in names]


def load_run_config(path: Path | None) -> dict:
    """A launchpad-style run config file: `ops: {<asset>: {config: {...}}}`."""
    if path is None:
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict) or set(config) - {"ops"}:
        raise SystemExit(
            f"laion-assets: {path}: expected a mapping with only an `ops:` block, got {config!r}"
        )
    return config


def run_pipeline(
    root: str,
    assets: list[dg.AssetsDefinition],
    run_config: dict,
    force: bool = False,
    echo: Callable[[str], None] = print,
    clip: ClipSettings | None = None,
) -> list[ShardOutcome]:
    """Register a shard per file in `incoming/`, materialise the selected assets each shard lacks, then the
    selected dataset-level assets (catalog, dataset_card) over every shard."""
    resources_ = build_resources(root, clip)
    store = resources_["store"].get_store()
    shard_names = sorted({parse_source_name(f.name).shard for f in store.list(INCOMING)})
    echo(f"{len(shard_names)} shards in {store.url(INCOMING)}")
    outcomes = []
    with dagster_instance() as instance:
        known = set(instance.get_dynamic_partitions(shards.name))
        instance.add_dynamic_partitions(shards.name, [s for s in shard_names if s not in known])
        per_shard = [a for a in assets if a in PER_SHARD_ASSETS]
        for shard in shard_names:
            todo = [
                a
                for a in per_shard
                if force
                or not store.exists(store.shard_file(a.metadata_by_key[a.key][LAYER], shard, "parquet"))
            ]
            outcome = (
                _materialize(instance, resources_, shard, todo, run_config) if todo else ShardOutcome(shard)
            )
            echo(outcome.line())
            outcomes.append(outcome)
        for asset in (a for a in assets if a not in PER_SHARD_ASSETS):
            name = asset.key.to_user_string()
            result = dg.materialize(
                [asset], instance=instance, resources=resources_, run_config=QUIET, raise_on_error=False
            )
            error = failure_message(result)
            path = None if error else result.asset_materializations_for_node(name)[0].metadata["path"].value
            outcomes.append(ShardOutcome("(dataset)", ran=[name], error=error))
            echo(f"{name}: FAILED: {error}" if error else f"{name}: {path}")
    return outcomes


def _materialize(
    instance: dg.DagsterInstance,
    resources_: dict[str, dg.ConfigurableResource],
    shard: str,
    todo: list[dg.AssetsDefinition],
    run_config: dict,
) -> ShardOutcome:
    names = [a.key.to_user_string() for a in todo]
    ops = {name: block for name, block in (run_config.get("ops") or {}).items() if name in names}
    result = dg.materialize(
        PER_SHARD_ASSETS,
        selection=todo,
        partition_key=shard,
        instance=instance,
        resources=resources_,
        run_config={"ops": ops, **QUIET} if ops else QUIET,
        raise_on_error=False,
        tags={"laion_assets/trigger": "cli"},
    )
    outcome = ShardOutcome(shard, ran=names)
    for name in names:
        for materialization in result.asset_materializations_for_node(name):
            outcome.rows[name] = materialization.metadata["dagster/row_count"].value
    outcome.error = failure_message(result)
    return outcome


def failure_message(result: dg.ExecuteInProcessResult) -> str | None:
    """The first error of the first failed step that Dagster did not wrap, without its class name.

    Dagster wraps the asset's exception; that exception may itself wrap a library error, and its own
    message (with the advice in it) is the one to show. None if no step failed.
    """
    failure = next((e for e in result.all_events if e.is_step_failure), None)
    if failure is None:
        return None
    error = failure.step_failure_data.error
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error.message.strip().split(f"{error.cls_name}: ", 1)[-1]


OUTPUT_FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}


def run_sql(root: str, query: str, fmt: str = "table", output: Path | None = None) -> None:
    """Run `query` against the DuckDB views of `root`; print it, or write it to `output`."""
    connection = duckdb_catalog.connect(DatasetStore(root))
    if output is not None:
        kind = OUTPUT_FORMATS.get(output.suffix.lower())
        if kind is None:
            raise SystemExit(f"laion-assets: --output must end in one of {list(OUTPUT_FORMATS)}")
        options = "FORMAT json, ARRAY true" if kind == "json" else f"FORMAT {kind}"
        target = duckdb_catalog.quote_literal(str(output))
        connection.execute(f"COPY ({query.rstrip().rstrip(';')}) TO '{target}' ({options})")
        print(f"wrote {output}")
        return
    relation = connection.sql(query)
    if fmt == "table":
        relation.show(max_rows=100, max_width=200)
        return
    columns, rows = relation.columns, relation.fetchall()
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(rows)
    else:
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], default=str, indent=1))


def seed_demo_input(root: str) -> list[str]:
    """Copy the packaged sample sources into `{root}/incoming/` where they are not there yet."""
    store = DatasetStore(root)
    copied = []
    for sample in resources.files("laion_assets").joinpath("sample").iterdir():
        target = f"{INCOMING}/{sample.name}"
        if not store.exists(target):
            store.write_bytes(target, sample.read_bytes())
            copied.append(sample.name)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="laion-assets", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    root_help = "dataset root: a folder or s3://bucket/prefix (default: $LAION_ASSETS_ROOT, else ./data)"

    run = sub.add_parser("run", help="materialise the per-shard assets for every file in {root}/incoming/")
    run.add_argument("--root", default=None, help=root_help)
    run.add_argument("--select", default=None, help="comma-separated asset names (default: all)")
    run.add_argument("--config", type=Path, default=None, help="run config YAML, as in the launchpad")
    run.add_argument("--force", action="store_true", help="materialise again where the outputs exist")

    demo = sub.add_parser("demo", help="copy the sample input into {root}/incoming/ and run everything")
    demo.add_argument("--root", default=None, help=root_help)
    demo.add_argument("--model", default="laion-assets-tiny", help="open_clip model name")
    demo.add_argument("--pretrained", default="none", help="open_clip tag, checkpoint path, or none")

    sql = sub.add_parser("sql", help="query the DuckDB views (crawl_metadata, images, embeddings, pairs)")
    sql.add_argument("query", help='e.g. "SELECT status, count(*) FROM images GROUP BY 1"')
    sql.add_argument("--root", default=None, help=root_help)
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument(
        "--output", type=Path, default=None, help="write the result to a .csv, .json or .parquet file"
    )

    args = parser.parse_args(argv)
    root = args.root or root_from_env()
    if args.command == "sql":
        run_sql(root, args.query, args.format, args.output)
        return 0
    if args.command == "demo":
        copied = seed_demo_input(root)
        print(f"sample input: {', '.join(copied) or 'already in place'}")
        clip = dataclasses.replace(ClipSettings.from_env(), model=args.model, pretrained=args.pretrained)
        outcomes = run_pipeline(root, list(ALL_ASSETS), {}, clip=clip)
        print(f"outputs under {DatasetStore(root).url('')}")
        print(f"open the Dagster UI on the same data: LAION_ASSETS_ROOT={root} dagster dev")
    else:
        assets = select_assets(args.select.split(",") if args.select else None)
        outcomes = run_pipeline(root, assets, load_run_config(args.config), force=args.force)
    return 1 if any(o.error for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
