"""The `laion-assets` command: run the per-shard assets, the demo, SQL queries, the CLIP service.

Each sub-command imports what it needs when it runs: `sql` never loads Dagster, FastAPI or torch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from laion_assets import names
from laion_assets.demo import DEMO_CAPTION_CHECKPOINT, DEMO_CAPTION_MODEL, DEMO_CHECKPOINT, DEMO_MODEL
from laion_assets.pipeline.embeddings.clip import ClipSettings
from laion_assets.pipeline.recaptions.caption import CaptionSettings
from laion_assets.pipeline.settings import DatasetSettings, SettingsFileError, load_settings
from laion_assets.pipeline.storage import DatasetStore, root_from_env
from laion_assets.service.settings import API_KEY_ENV, MIN_API_KEY_CHARS, ServiceSettings, WeakApiKey

if TYPE_CHECKING:
    import dagster as dg


def select_assets(names: list[str] | None) -> list[dg.AssetsDefinition]:
    from laion_assets.runner import ALL_ASSETS

    by_name = {a.key.to_user_string(): a for a in ALL_ASSETS}
    if not names:
        return list(ALL_ASSETS)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"laion-assets: unknown assets {unknown}; choose from {list(by_name)}")
    return [by_name[n] for n in names]


def load_run_config(path: Path | None) -> dict:
    """A launchpad-style run config file: `ops: {<asset>: {config: {...}}}`."""
    from laion_assets.defs.config import read_run_config
    from laion_assets.runner import check_run_config

    if path is None:
        return {}
    try:
        config = read_run_config(path)
    except ValueError as exc:
        raise SystemExit(f"laion-assets: {exc}") from exc
    try:
        check_run_config(config)
    except ValueError as exc:
        raise SystemExit(f"laion-assets: {path}: {exc}") from exc
    return config


OUTPUT_FORMATS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}


def run_sql(root: str, query: str, fmt: str = "table", output: str | None = None) -> None:
    """Run `query` against the DuckDB views of `root`; print it, or write it to `output`: a local file,
    written under a temporary name and renamed, or an s3:// URL (an upload DuckDB completes at its end)."""
    from laion_assets.pipeline.catalog import views as duckdb_catalog
    from laion_assets.pipeline.storage import DatasetStore, remove_abandoned_beside, temporary_name

    store = DatasetStore(root)
    connection = duckdb_catalog.connect(store)
    if output is not None:
        kind = OUTPUT_FORMATS.get(os.path.splitext(output)[1].lower())
        if kind is None:
            raise SystemExit(f"laion-assets: --output must end in one of {list(OUTPUT_FORMATS)}")
        options = "FORMAT json, ARRAY true" if kind == "json" else f"FORMAT {kind}"
        # the query ends a statement, as typed: inside `COPY (...)` a trailing `-- comment` or `;` broke it
        connection.execute(f"CREATE TEMP VIEW laion_assets_output AS\n{query}")

        def copy_to(target: str) -> None:
            quoted = duckdb_catalog.quote_literal(target)
            connection.execute(f"COPY (FROM laion_assets_output) TO '{quoted}' ({options})")

        if output.startswith("s3://"):
            if not store.is_s3:
                duckdb_catalog.enable_s3(connection)
            copy_to(output)
        else:
            folder = os.path.dirname(os.path.abspath(output))
            if not os.path.isdir(folder):
                raise SystemExit(f"laion-assets sql: --output {output}: no folder {folder}")
            remove_abandoned_beside(output)  # what a killed query left
            tmp = temporary_name(os.path.abspath(output))
            try:
                copy_to(tmp)
                os.replace(tmp, output)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
                raise
        print(f"wrote {output}")
        return
    relation = connection.sql(query)
    if relation is None:  # a statement without a result: COPY ... TO, SET, CREATE ...
        return
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


def require_dataset(root: str, command: str) -> None:
    """Stop `command` where `root` holds no dataset: a mistyped root would otherwise be made a new one."""
    problem = DatasetStore(root).no_dataset_here()
    if problem:
        raise SystemExit(f"laion-assets {command}: {problem}")


def what_root_has(root: str) -> str:
    """One line for a query that named a view `root` lacks: its views, or why it has none."""
    from laion_assets.pipeline.catalog import views as duckdb_catalog

    store = DatasetStore(root)
    views = duckdb_catalog.view_names(duckdb_catalog.connect(store))
    if views:
        return f"the views of {store.root}: {', '.join(sorted(views))}"
    return store.no_dataset_here() or f"{store.root} has no views yet: no layer has parquet files there"


def sql_shell(root: str) -> None:
    """An interactive shell on the DuckDB views of `root`, as DuckDB's own: a statement ends with `;`,
    `.tables` lists the views, `.quit` or the end of input leaves."""
    import readline  # noqa: F401  (line editing and history for input())

    import duckdb

    from laion_assets.pipeline.catalog import views as duckdb_catalog
    from laion_assets.pipeline.storage import DatasetStore

    connection = duckdb_catalog.connect(DatasetStore(root))
    views = ", ".join(name for (name,) in connection.sql("SHOW TABLES").fetchall())
    print(f"DuckDB on {root}: {views}\nend a statement with ';'; .tables lists the views; .quit leaves")
    statement: list[str] = []
    while True:
        try:
            line = input("... " if statement else "sql> ")
        except EOFError:
            print()
            return
        if not statement and line.strip() in (".quit", ".exit"):
            return
        if not statement and line.strip() == ".tables":
            print(views)
            continue
        statement.append(line)
        if line.rstrip().endswith(";"):
            try:
                relation = connection.sql("\n".join(statement))
                if relation is not None:
                    relation.show(max_rows=100, max_width=200)
            except duckdb.Error as exc:
                print(f"{type(exc).__name__}: {exc}")
            statement = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laion-assets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    root_help = "dataset root: a folder or s3://bucket/prefix (default: $LAION_ASSETS_ROOT, else ./data)"

    run = sub.add_parser("run", help="materialise the per-shard assets for every file in {root}/incoming/")
    run.add_argument("--root", default=None, help=root_help)
    run.add_argument("--select", default=None, help="comma-separated asset names (default: all)")
    run.add_argument("--config", type=Path, default=None, help="run config YAML, as in the launchpad")
    run.add_argument("--force", action="store_true", help="materialise again where the outputs exist")
    run.add_argument(
        "--rebuild-stale",
        action="store_true",
        help="also rebuild the layers built with other settings than the dataset's (see `status`)",
    )
    run.add_argument(
        "--accept-settings-change",
        action="store_true",
        help="let dedup run with other rules than the dataset was deduplicated with (recorded in the card)",
    )

    init = sub.add_parser(
        "init", help="write the dataset's settings, {root}/laion_assets.yaml: the defaults, under --config"
    )
    init.add_argument("--root", default=None, help=root_help)
    init.add_argument("--config", type=Path, default=None, help="run config YAML whose values to keep")

    status = sub.add_parser(
        "status",
        help="which shards are not done, and which layers were built with other settings than the dataset's",
    )
    status.add_argument("--root", default=None, help=root_help)

    demo = sub.add_parser(
        "demo",
        help="serve a synthetic web on 127.0.0.1, drop its URL lists into {root}/incoming/, run everything",
    )
    demo.add_argument("--root", default=None, help=root_help)
    demo.add_argument("--model", default=DEMO_MODEL, help="open_clip model name (default: the demo's own)")
    demo.add_argument(
        "--pretrained", default=str(DEMO_CHECKPOINT), help="open_clip tag, checkpoint path, or none"
    )
    demo.add_argument(
        "--caption-model", default=DEMO_CAPTION_MODEL, help="open_clip CoCa model (default: the demo's own)"
    )
    demo.add_argument(
        "--caption-pretrained",
        default=str(DEMO_CAPTION_CHECKPOINT),
        help="its open_clip tag, checkpoint path, or none",
    )
    demo.add_argument(
        "--images",
        type=int,
        default=300,
        help="images in the synthetic web (at least 12: a planted copy of each kind, of a distinct image)",
    )

    sql = sub.add_parser(
        "sql",
        help="query the DuckDB views (crawl_metadata, images, pairs, recaptions, hosts, takedowns, ...)",
    )
    sql.add_argument(
        "query",
        nargs="?",
        help='e.g. "SELECT status, count(*) FROM images GROUP BY 1"; without one, an interactive shell',
    )
    sql.add_argument("--root", default=None, help=root_help)
    sql.add_argument("--format", choices=["table", "csv", "json"], default="table")
    sql.add_argument(
        "--output", default=None, help="write the result to a .csv, .json or .parquet file, local or s3://"
    )

    takedown = sub.add_parser(
        "takedown",
        help="copy a block list into {root}/blocklist/, remove what it matches from every built layer, "
        "then rebuild the search index, catalog and card",
    )
    takedown.add_argument("file", type=Path, help="a .txt, .csv or .parquet list (see docs/takedowns.md)")
    takedown.add_argument("--root", default=None, help=root_help)

    serve = sub.add_parser(
        "serve", help="the CLIP HTTP API: embed images and texts, compare them, search the dataset"
    )
    serve.add_argument("--host", default=ServiceSettings.host)
    serve.add_argument("--port", type=int, default=ServiceSettings.port)
    serve.add_argument("--root", default=None, help=f"{root_help}; /search uses its search index")
    serve.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"required from every client when set (default: ${API_KEY_ENV}; none); at least "
        f"{MIN_API_KEY_CHARS} characters",
    )
    serve.add_argument(
        "--allow-short-api-key",
        action="store_true",
        help=f"accept a key under {MIN_API_KEY_CHARS} characters",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=ServiceSettings.max_batch,
        help="images or compare prompts per request",
    )
    serve.add_argument("--max-image-bytes", type=int, default=ServiceSettings.max_image_bytes)
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=ServiceSettings.batch_wait * 1000,
        help="how long a batch waits for requests still being prepared",
    )
    serve.add_argument("--no-batching", action="store_true", help="one model call per request")
    serve.add_argument(
        "--allow-private-networks",
        action="store_true",
        help="fetch url images from loopback and private networks",
    )

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except SettingsFileError as exc:  # a hand edit gone wrong: one line naming the file, not a traceback
        raise SystemExit(f"laion-assets {args.command}: {exc}") from exc


def _command(args: argparse.Namespace) -> int:
    root = args.root or root_from_env()
    if args.command == "serve":
        return serve(args, root)
    if args.command == "sql":
        if args.query is None:
            sql_shell(root)
            return 0
        import duckdb  # where it queries: see catalog.views

        try:
            run_sql(root, args.query, args.format, args.output)
        except duckdb.CatalogException as exc:  # a view the root lacks: a mistyped view, or root
            raise SystemExit(f"laion-assets sql: {exc}\n{what_root_has(root)}") from exc
        except duckdb.Error as exc:  # a mistyped query: DuckDB's message, as its own CLI prints it
            raise SystemExit(f"laion-assets sql: {exc}") from exc
        return 0
    if args.command == "init":
        from laion_assets.runner import init_settings

        try:
            print(f"wrote {init_settings(root, load_run_config(args.config))}")
        except FileExistsError as exc:
            raise SystemExit(f"laion-assets init: {exc}") from exc
        return 0
    if args.command == "status":
        from laion_assets.runner import dataset_status

        require_dataset(root, args.command)
        lines, stale = dataset_status(root)
        print("\n".join(lines))
        return 1 if stale else 0
    if args.command == "takedown":
        from laion_assets.runner import run_takedown

        try:
            return run_takedown(root, args.file)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"laion-assets takedown: {exc}") from exc
    if args.command == "demo":
        from laion_assets.demo.run import RootInUse, run_demo

        clip = dataclasses.replace(ClipSettings.from_env(), model=args.model, pretrained=args.pretrained)
        captioner = dataclasses.replace(
            CaptionSettings.from_env(), model=args.caption_model, pretrained=args.caption_pretrained
        )
        from laion_assets.demo.run import MIN_IMAGES

        if args.images < MIN_IMAGES:
            raise SystemExit(f"laion-assets demo: --images must be at least {MIN_IMAGES}, got {args.images}")
        try:
            return run_demo(root, clip, captioner, images=args.images)
        except RootInUse as exc:
            raise SystemExit(f"laion-assets demo: {exc}") from exc
    if args.select is None or names.DOWNLOADED_IMAGES_ASSET in args.select.split(","):
        from laion_assets.pipeline.download.downloader import start_worker_server

        start_worker_server()  # it imports the download code on the other core while Dagster loads here
    from laion_assets.runner import run_pipeline

    assets = select_assets(args.select.split(",") if args.select is not None else None)
    run_config = load_run_config(args.config)
    require_dataset(root, args.command)
    if args.accept_settings_change:
        block = run_config.setdefault("ops", {}).setdefault(names.DUPLICATES_ASSET, {})
        block.setdefault("config", {})["accept_settings_change"] = True
    outcomes = run_pipeline(root, assets, run_config, force=args.force, rebuild_stale=args.rebuild_stale)
    return 1 if any(o.error for o in outcomes) else 0


def serve(args: argparse.Namespace, root: str) -> int:
    from laion_assets.pipeline.embeddings.clip import ModelUnavailable
    from laion_assets.service.app import serve as serve_clip

    settings = ServiceSettings(
        host=args.host,
        port=args.port,
        root=root,
        api_key=args.api_key,
        max_batch=args.max_batch,
        max_image_bytes=args.max_image_bytes,
        batching=not args.no_batching,
        batch_wait=args.batch_wait_ms / 1000,
        allow_private_networks=args.allow_private_networks,
        allow_short_api_key=args.allow_short_api_key,
    )
    clip = ClipSettings.from_dataset(load_settings(DatasetStore(root)) or DatasetSettings())
    try:
        serve_clip(settings, clip)
    except (ModelUnavailable, WeakApiKey) as exc:
        raise SystemExit(f"laion-assets serve: {exc}") from exc
    return 0


def command() -> None:
    """The `laion-assets` console script. The garbage collector's youngest generation is collected
    after 50,000 new objects instead of 700: a run's start-up (importing Dagster and the definitions,
    then Dagster's instance) makes about 370,000 that live to the end, and collecting among them as
    they came found no garbage and cost 0.4 to 0.7 s of CPU (1.81 to 2.15 s against 1.36 to 1.44 s,
    `time.process_time()` of those imports and the instance). Before the interpreter exits it freezes
    the collector's objects: its last collection would otherwise walk everything Dagster loaded, 0.6 to
    0.9 s of a 10 s download run (profiled), paid at the end of every command."""
    gc.set_threshold(50_000)
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
