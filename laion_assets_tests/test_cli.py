import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import urllib3
import yaml

from laion_assets import names
from laion_assets.cli import main
from laion_assets.defs.partitions import shards
from laion_assets.demo.run import DEMO_COPIES
from laion_assets.pipeline.storage import SETTINGS_FILE, DatasetStore
from laion_assets_tests.dagster_helpers import local_web_config, shard_pipeline
from laion_assets_tests.service_process import TINY_MODEL_ENV, serving

A = b"url,caption\nhttp://a.com/1.jpg,a cat\nhttp://a.com/2.jpg,a dog\n"
B = b'{"link": "http://b.com/1.jpg", "caption": "a bird"}\n'


@pytest.fixture(autouse=True)
def _no_dagster_home(monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)


def test_run_every_shard_then_nothing_left(root, tmp_path, capsys):
    store = DatasetStore(root)
    store.write_bytes("incoming/a.csv", A)
    store.write_bytes("incoming/b.jsonl", B)
    # only the crawl stage here: these URLs go nowhere (downloads: test_run_downloads_from_the_local_web)
    assert main(["run", "--root", root, "--select", "crawl_metadata"]) == 1  # b: no URL column it knows
    out = capsys.readouterr().out
    assert "2 shards in" in out
    assert "a: crawl_metadata 2 rows" in out
    assert "b: FAILED (crawl_metadata): b.jsonl: no URL column found" in out
    assert store.read_parquet("crawl_metadata/a.parquet").num_rows == 2

    # a run config, as the launchpad takes it, fixes b; a is skipped as present
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  crawl_metadata:\n    config:\n      url_column: link\n")
    assert main(["run", "--root", root, "--select", "crawl_metadata", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "a: up to date" in out
    assert "b: crawl_metadata 1 rows" in out

    assert main(["run", "--root", root, "--select", "crawl_metadata", "--force"]) == 1
    assert "a: crawl_metadata 2 rows" in capsys.readouterr().out


@pytest.mark.parametrize(("per_run", "runs"), [(None, 1), ("2", 2), ("1", 3)])
def test_run_puts_consecutive_shards_with_the_same_work_in_one_run(
    local_root, tmp_path, monkeypatch, capsys, per_run, runs
):
    """Up to $LAION_ASSETS_SHARDS_PER_RUN shards (8 where unset) share a run, so that their downloads are
    pipelined and the run's fixed cost is paid once; each shard still gets its line."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    if per_run:
        monkeypatch.setenv("LAION_ASSETS_SHARDS_PER_RUN", per_run)
    store = DatasetStore(local_root)
    for name in ("a", "b", "c"):
        store.write_bytes(f"incoming/{name}.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.endswith("crawl_metadata 2 rows")] == [
        f"{name}: crawl_metadata 2 rows" for name in "abc"
    ]
    with dg.DagsterInstance.get() as instance:
        assert len(instance.get_runs()) == runs
        assert instance.get_materialized_partitions(dg.AssetKey("crawl_metadata")) == {"a", "b", "c"}


def test_cli_runs_are_runs_of_the_projects_jobs_and_re_execute(local_root, tmp_path, monkeypatch, capsys):
    """`laion-assets run` launches the shard job and the dataset job, not Dagster's ephemeral one: each run
    names its shard and assets, and Re-execute (here from Python, as the UI's button does it, from the
    code location's own job) runs it again."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("LAION_ASSETS_ROOT", local_root)  # the code location's dataset
    DatasetStore(local_root).write_bytes("incoming/a.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata,catalog"]) == 0
    with dg.DagsterInstance.get() as instance:
        runs = {run.job_name: run for run in instance.get_runs()}
        assert set(runs) == {names.SHARD_JOB, names.DATASET_JOB}
        shard_run = runs[names.SHARD_JOB]
        assert shard_run.tags["dagster/partition"] == "a" and shard_run.tags[names.TRIGGER_TAG] == "cli"
        assert shard_run.asset_selection == {dg.AssetKey("crawl_metadata")}
        assert runs[names.DATASET_JOB].asset_selection == {dg.AssetKey("catalog")}
        again = dg.execute_job(
            dg.reconstructable(shard_pipeline),
            instance,
            tags=shard_run.tags,  # as the UI launches a re-execution: with the run's tags, its partition's
            reexecution_options=dg.ReexecutionOptions(parent_run_id=shard_run.run_id),
        )
        assert again.success
        assert again.dagster_run.parent_run_id == shard_run.run_id
        assert again.dagster_run.tags["dagster/partition"] == "a"
        materializations = instance.fetch_materializations(dg.AssetKey("crawl_metadata"), limit=10).records
        assert [m.run_id for m in materializations] == [again.run_id, shard_run.run_id]


def test_run_registers_shards_in_dagster_home(local_root, tmp_path, monkeypatch, capsys):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    DatasetStore(local_root).write_bytes("incoming/a.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    with dg.DagsterInstance.get() as instance:
        assert instance.get_dynamic_partitions(shards.name) == ["a"]
        assert instance.get_materialized_partitions(dg.AssetKey("crawl_metadata")) == {"a"}


def test_run_downloads_from_the_local_web(root, web, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an S3 root's catalog file goes to the working folder
    # the model is chosen the way a deployment chooses it
    monkeypatch.setenv("LAION_ASSETS_CLIP_MODEL", "laion-assets-tiny")
    monkeypatch.setenv("LAION_ASSETS_CLIP_PRETRAINED", "none")
    monkeypatch.setenv("LAION_ASSETS_CAPTION_MODEL", "laion-assets-demo-coca")
    monkeypatch.setenv("LAION_ASSETS_CAPTION_PRETRAINED", "none")
    store = DatasetStore(root)
    urls = [web.url("/img/red.jpg"), web.url("/404.jpg"), web.url("/img/blue.webp")]
    store.write_bytes(
        "incoming/w.csv", ("url,caption\n" + "".join(f"{u},image {i}\n" for i, u in enumerate(urls))).encode()
    )
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(local_web_config()))
    assert main(["run", "--root", root, "--config", str(config)]) == 0
    assert (
        "w: crawl_metadata 3 rows, downloaded_images 3 rows, clip_embeddings 2 rows"
        in capsys.readouterr().out
    )
    assert store.read_parquet("images/w.parquet").column("status").to_pylist() == [
        "success",
        "failed_to_download",
        "success",
    ]
    assert main(["run", "--root", root]) == 0
    assert "w: up to date" in capsys.readouterr().out


def test_unknown_asset_and_bad_config(local_root, tmp_path):
    with pytest.raises(SystemExit, match=r"unknown assets \['nope'\]"):
        main(["run", "--root", local_root, "--select", "nope"])
    # an empty selection (`--select "$ASSETS"`, the variable unset) selected every asset, downloads and all
    with pytest.raises(SystemExit, match=r"unknown assets \[''\]"):
        main(["run", "--root", local_root, "--select", ""])
    bad = tmp_path / "bad.yaml"
    bad.write_text("resources:\n  store: {}\n")
    with pytest.raises(SystemExit, match="only an `ops:` block"):
        main(["run", "--root", local_root, "--config", str(bad)])
    bad.write_text("ops: [\n")  # not YAML, or no file: one line naming it too, not a traceback
    with pytest.raises(SystemExit, match=rf"laion-assets: {bad}: while parsing a flow node expected"):
        main(["run", "--root", local_root, "--config", str(bad)])
    with pytest.raises(SystemExit, match=rf"laion-assets: {tmp_path}/none.yaml: \[Errno 2\] No such file"):
        main(["init", "--root", local_root, "--config", str(tmp_path / "none.yaml")])


def test_a_run_config_no_run_can_use_never_becomes_the_dataset_s_settings(local_root, tmp_path):
    """`max_pixels: 0` is of the right type, so the launchpad's check took it; the first run wrote it into
    laion_assets.yaml before the downloader refused it, and every later run, whatever its config, failed
    on it until the file was edited by hand. It is now refused in one line naming the file, first."""
    Path(local_root, "incoming").mkdir(parents=True, exist_ok=True)
    DatasetStore(local_root).write_bytes("incoming/a.csv", b"url,caption\nhttp://a.example/1.jpg,a cat\n")
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  downloaded_images:\n    config:\n      max_pixels: 0\n")
    for command in ("run", "init"):
        with pytest.raises(SystemExit) as stopped:
            main([command, "--root", local_root, "--config", str(config)])
        assert str(stopped.value.code) == (
            f"laion-assets: {config}: downloaded_images: max_pixels 0 is not 1-178956970 (Pillow refuses an "
            "image of more pixels than 178956970 as a decompression bomb, whatever max_pixels says)"
        )
    assert not Path(local_root, "laion_assets.yaml").exists()


def test_a_broken_settings_file_is_one_line_naming_it(local_root):
    """A hand edit of laion_assets.yaml gone wrong stops `run` and `status` with a line naming the file, as
    a bad --config does, not with a traceback."""
    Path(local_root, "incoming").mkdir(parents=True, exist_ok=True)
    Path(local_root, "laion_assets.yaml").write_text("crawl_metadata: 5\n")
    for command in ("run", "status"):
        with pytest.raises(SystemExit) as stopped:
            main([command, "--root", local_root])
        assert re.fullmatch(
            rf"laion-assets {command}: \S*laion_assets.yaml: expected a mapping of sections \(.*\)",
            str(stopped.value.code),
        )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("downloaded_images:\n  on: 5\n", "a key is read as bool True, not a name: quote it"),
        ("crawl_metadata: {}\n2024: {}\n", "a key is read as int 2024, not a name: quote it"),
        ("crawl_metadata:\n  url_column: [link\n", "not valid YAML: while parsing a flow sequence .*line 2"),
    ],
)
def test_a_settings_file_with_unnamed_keys_or_cut_short_is_one_line_naming_it(local_root, text, says):
    """YAML reads `on:` as a bool and `2024:` as an int: sorting and matching the names raised TypeError out
    of `status` and `run`; and a syntax error was PyYAML's message over several lines."""
    Path(local_root, "incoming").mkdir(parents=True, exist_ok=True)
    Path(local_root, "laion_assets.yaml").write_text(text)
    for command in ("run", "status"):
        with pytest.raises(SystemExit) as stopped:
            main([command, "--root", local_root])
        line = str(stopped.value.code)
        assert re.fullmatch(rf"laion-assets {command}: \S*laion_assets.yaml: {says}.*", line)


def test_demo_as_a_user_runs_it(tmp_path, monkeypatch):
    """The installed console script, in a fresh folder, with the default root and no network: the
    synthetic web's mismatched captions are caught by the CLIP filter with the demo's own model, and
    the demo's CoCa recaptions the kept pairs, naming what the images show."""
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "LAION_ASSETS_ROOT")}
    script = os.path.join(os.path.dirname(sys.executable), "laion-assets")
    done = subprocess.run(
        [script, "demo"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    score = re.search(r"precision ([\d.]+), recall ([\d.]+)", done.stdout)
    assert score and float(score[1]) >= 0.9 and float(score[2]) >= 0.9, done.stdout
    dedup = re.search(
        r"exact duplicates precision ([\d.]+), recall ([\d.]+) .*; near copies precision ([\d.]+), "
        r"recall ([\d.]+)",
        done.stdout,
    )
    assert dedup and float(dedup[1]) == float(dedup[2]) == 1.0, done.stdout
    assert float(dedup[3]) >= 0.9 and float(dedup[4]) >= 0.9, done.stdout
    store = DatasetStore(str(tmp_path / "data"))
    statuses = store.read_parquet("images/synthetic-web-0.parquet").column("status").to_pylist()
    assert {"success", "failed_to_download", "failed_to_decode", "opted_out"} <= set(statuses)
    for shard in ("synthetic-web-0", "synthetic-web-1"):
        assert store.read_parquet(f"pairs/{shard}.parquet").num_rows > 0
    with store.open("card/README.md") as f:
        assert "synthetic-web-1.parquet" in f.read().decode()
    # the demo world is not the captioner's training world: both figures are on images it never saw
    kept, every = re.findall(r"naming the true colour and shape: (\d+)/(\d+) \(.*?\); (.*)", done.stdout)
    recaptioned = sum(
        store.parquet_num_rows(f"recaptions/{s}.parquet") for s in ("synthetic-web-0", "synthetic-web-1")
    )
    assert int(kept[1]) == recaptioned and int(kept[0]) >= 0.9 * recaptioned, done.stdout
    images = 300 + sum(DEMO_COPIES.values())  # the world's, and its planted copies
    assert int(every[1]) == images and int(every[0]) >= 0.9 * images, done.stdout
    improved = re.fullmatch(r"mismatched pairs whose recaption scores higher: (\d+)/60 \(.*\)", every[2])
    assert improved and int(improved[1]) >= 54, done.stdout
    assert "│ success" in done.stdout  # the DuckDB query's result
    # only the project's own lines: no instance, telemetry or FAISS notices between the results
    for noise in ("dagster.yaml", "Telemetry", "Welcome to Dagster", "WARNING clustering"):
        assert noise not in done.stdout + done.stderr, noise
    # each path once; each command it prints runs as printed, without an activated venv
    paths = [
        line.split(": ", 1)[1]
        for line in done.stdout.splitlines()
        if line.startswith(("catalog: ", "dataset_card: "))
    ]
    assert len(paths) == 2 and all(done.stdout.count(path) == 1 for path in paths), done.stdout
    executables = re.findall(r"(\S+/(?:dagster|laion-assets)) (?:dev|serve|sql) ", done.stdout)
    assert len(executables) == 3 and all(os.path.isabs(e) and os.access(e, os.X_OK) for e in executables)
    assert f"DAGSTER_HOME={tmp_path / 'data' / '.dagster'}" in done.stdout
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "data" / ".dagster"))  # the demo's runs are kept there
    with dg.DagsterInstance.get() as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("dataset_card")) is not None
        # what the UI's "Auto-materialize off" badge reads (dagster-graphql's autoMaterializePaused)
        from dagster._daemon.asset_daemon import get_auto_materialize_paused

        assert get_auto_materialize_paused(instance) is False
        assert instance.nux_enabled is False  # no "Join the Dagster community" dialog over the UI


def test_demo_leaves_a_root_holding_another_dataset_alone(local_root, tmp_path):
    """`demo` and `run` share the default root (./data, or $LAION_ASSETS_ROOT): on a root that holds the
    user's own dataset, the demo would replace its settings and rebuild its shards with the demo's models."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    settings = b"crawl_metadata:\n  url_column: link\ndownloaded_images:\n  image_size: 384\n"
    store.write_bytes(SETTINGS_FILE, settings)
    with pytest.raises(SystemExit, match=r"laion-assets demo: .*data holds a dataset that is not the demo's"):
        main(["demo", "--root", local_root, "--images", "12"])
    assert store.read_bytes(SETTINGS_FILE) == settings
    assert [f.name for f in store.list("incoming")] == ["a.csv"]
    assert not store.exists("crawl_metadata/a.parquet")


def test_serve_answers_with_the_model_from_the_environment(local_root):
    """The installed console script serves on the port it is given, with the key and model it is given."""
    key = "a-key-of-24-characters-x"  # at least 16: a shorter one is refused (see below)
    http = urllib3.PoolManager(retries=False)
    with serving("--root", local_root, "--api-key", key, "--max-batch", "2") as served:
        url = served.url
        info = http.request("GET", f"{url}/info?api_key={key}", timeout=10)
        assert info.status == 200, info.data
        assert (info.json()["model"], info.json()["max_batch"]) == ("laion-assets-tiny", 2)
        assert "no search index at" in info.json()["search_index_problem"]
        assert http.request("GET", f"{url}/info", timeout=10).status == 401


def test_serve_answers_with_the_model_the_dataset_records(local_root, monkeypatch):
    """Without the LAION_ASSETS_CLIP_* variables, `serve --root` embeds with the model of the dataset's
    settings, as `run` and `takedown` do: the model that filtered it and built its search index."""
    for variable in TINY_MODEL_ENV:
        monkeypatch.delenv(variable, raising=False)
    clip = {"model": "laion-assets-tiny", "pretrained": "none", "seed": 0}
    DatasetStore(local_root).write_bytes(SETTINGS_FILE, yaml.safe_dump({"clip": clip}).encode())
    with serving("--root", local_root, model_env={}) as served:
        info = urllib3.PoolManager(retries=False).request("GET", f"{served.url}/info", timeout=10)
        assert info.status == 200, info.data
        assert (info.json()["model"], info.json()["pretrained"]) == ("laion-assets-tiny", "none")


def test_serve_refuses_a_short_key_unless_allowed(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="the API key has 8 characters, under 16: use a longer one"):
        main(["serve", "--port", "0", "--api-key", "short-ky"])
    # allowed: it gets past the key to loading the model (here a missing checkpoint, to stop there)
    monkeypatch.setenv("LAION_ASSETS_CLIP_PRETRAINED", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match=r"checkpoint file .*missing.pt does not exist"):
        main(["serve", "--port", "0", "--api-key", "short-ky", "--allow-short-api-key"])


def test_serve_without_its_weights_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("LAION_ASSETS_CLIP_PRETRAINED", str(tmp_path / "missing.pt"))
    with pytest.raises(SystemExit, match=r"laion-assets serve: checkpoint file .*missing.pt does not exist"):
        main(["serve", "--port", "0"])


def test_run_reruns_a_shard_whose_source_file_was_replaced(local_root, capsys):
    """The CLI, the sensor and the catch-up schedule share one rule (pipeline/lineage.py): a shard is done
    when its outputs were made from the source file's current content, not merely when they exist."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    assert "a: crawl_metadata 2 rows" in capsys.readouterr().out
    store.write_bytes("incoming/a.csv", A + b"http://a.com/3.jpg,a bird\n")  # same name, new content
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    assert "a: crawl_metadata 3 rows" in capsys.readouterr().out
    assert store.read_parquet("crawl_metadata/a.parquet").num_rows == 3
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    assert "a: up to date" in capsys.readouterr().out


def test_a_second_file_making_a_done_shard_fails_it_instead_of_being_ignored(local_root, capsys):
    """`a.b.csv` makes shard `a_b`, as `a_b.csv` does: once `a_b` was done from `a_b.csv`, the new file
    was left out of the shard list, and the run said `a_b: up to date` and exited 0."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a_b.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    assert "a_b: crawl_metadata 2 rows" in capsys.readouterr().out
    store.write_bytes("incoming/a.b.csv", A + b"http://a.com/3.jpg,a bird\n")
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 1
    out = capsys.readouterr().out
    assert (
        "a_b: FAILED (crawl_metadata): several files in incoming/ make shard 'a_b': ['a.b.csv', 'a_b.csv']"
        in out
    )
    assert main(["status", "--root", local_root]) == 1
    assert "a_b: to make: crawl_metadata," in capsys.readouterr().out


def test_sql_loads_neither_dagster_nor_the_service_nor_torch(local_root):
    """A query is a fast command: it needs DuckDB and the store, not the definitions or the models."""
    check = (
        "import sys; from laion_assets.cli import main; main(['sql', 'SELECT 42 AS answer', '--root', "
        "sys.argv[1]]); print(sorted({'dagster', 'fastapi', 'matplotlib', 'torch', 'open_clip'} & "
        "set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check, local_root], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "42" in done.stdout and done.stdout.strip().splitlines()[-1] == "[]"


def test_a_misspelt_setting_is_named_by_run_and_status(local_root, capsys):
    """`image_sise: 384` under downloaded_images was dropped without a word: `status` said up to date and
    the user believed the dataset's image size changed. `run` and `status` name the file, the section and
    the key (a field an older version wrote, since removed, is reported alike: ignored, not an error)."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    settings = Path(store.path("laion_assets.yaml"))
    text = settings.read_text().replace("downloaded_images:\n", "downloaded_images:\n  image_sise: 384\n")
    settings.write_text(text + "filtered_pair:\n  min_similarity: 0.5\nclip:\n  pretraned: none\n")
    capsys.readouterr()
    url = store.url("laion_assets.yaml")
    expected = [
        f"{url}, section clip: pretraned is not one of its settings (did you mean pretrained?): ignored",
        f"{url}, section downloaded_images: image_sise is not one of its settings (did you mean "
        "image_size?): ignored",
        f"{url}: filtered_pair is not a section (did you mean filtered_pairs?): ignored",
    ]
    assert main(["status", "--root", local_root]) == 1  # the shard's other layers are still to make
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "ignored" in line] == expected
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "ignored" in line] == expected
    assert "a: up to date" in out


def test_status_names_a_built_shard_whose_source_file_is_gone(local_root, capsys):
    """A source file removed from incoming/ left its shard's layers in the dataset (the catalog, card and
    index read them), but `status` listed only the files in incoming/: the shard vanished from its report
    without a word, and nothing could ever make it again."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    store.write_bytes("incoming/b.csv", A)
    assert main(["run", "--root", local_root, "--select", "crawl_metadata"]) == 0
    Path(store.path("incoming/b.csv")).unlink()
    capsys.readouterr()
    assert main(["status", "--root", local_root]) == 1  # a's other layers are still to make
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("a: to make: ")
    assert out[2] == (
        "b: built (crawl_metadata) but no file in incoming/ makes it: its layers stay in the dataset, "
        "and no run makes them again"
    )


def test_status_before_the_first_run_lists_the_shards_to_make(local_root, capsys):
    """A root with files in incoming/ and no settings file yet (no run so far, or a dataset built before
    the file existed): `status` said only that the first run writes the settings, and exited 0, as if
    nothing were left to do."""
    DatasetStore(local_root).write_bytes("incoming/a.csv", A)
    assert main(["status", "--root", local_root]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("laion_assets.yaml yet: the first run writes them")
    assert out[1].startswith("a: to make: crawl_metadata, images, ")


def test_a_run_config_with_an_unknown_asset_or_field_is_refused_before_anything_is_written(
    local_root, tmp_path
):
    """A misspelt asset in --config (`crawl_metdata`) was dropped without a word, and the first run wrote
    the dataset's settings from the defaults it fell back on; a misspelt field or a value of the wrong type
    ended in Dagster's traceback (the settings file already written). Each is one line naming the file
    and what is wrong, as the launchpad refuses them, and the root is left as it was."""
    store = DatasetStore(local_root)
    store.write_bytes("incoming/a.csv", A)
    for config, wrong in (
        (
            "crawl_metdata:\n    config:\n      url_column: link",
            r"crawl_metdata is not an asset \(did you mean crawl_metadata\?\)",
        ),
        (
            "crawl_metadata:\n    config:\n      url_colum: link",
            r'unexpected config entry "url_colum" at path root:ops:crawl_metadata:config',
        ),
        (
            "crawl_metadata:\n    config:\n      min_alt_length: five",
            r"root:ops:crawl_metadata:config:min_alt_length. Value \"five\"",
        ),
    ):
        path = tmp_path / "run.yaml"
        path.write_text(f"ops:\n  {config}\n")
        for command in ("run", "init"):
            with pytest.raises(SystemExit) as stopped:
                main([command, "--root", local_root, "--config", str(path)])
            assert re.fullmatch(rf"laion-assets: {path}: .*{wrong}.*", str(stopped.value.code))
            assert "\n" not in str(stopped.value.code)
        assert sorted(os.listdir(local_root)) == ["incoming"]


@pytest.mark.parametrize("command", [["run", "--select", "crawl_metadata"], ["status"], ["takedown"]])
def test_a_mistyped_root_is_refused_not_made_a_new_dataset(root, tmp_path, command):
    """A --root (or $LAION_ASSETS_ROOT) where nothing is stored, a typo's: `run` made a new dataset there
    (settings, block list entries, catalog) and failed with Dagster's tracebacks; `takedown` copied the list
    there, removed nothing from the real dataset and exited 0; `status` reported nothing to do. Each is one
    line naming the root, and nothing is written there."""
    if command == ["takedown"]:
        listed = tmp_path / "takedown.txt"
        listed.write_text("url\nhttp://a.com/1.jpg\n")
        command = ["takedown", str(listed)]
    with pytest.raises(SystemExit) as stopped:
        main([*command, "--root", root])
    store = DatasetStore(root)
    assert str(stopped.value.code) == (
        f"laion-assets {command[0]}: no dataset at {store.root}: nothing is stored there "
        "(--root, else $LAION_ASSETS_ROOT)"
    )
    assert not store.exists("")


def test_a_root_that_is_a_file_is_one_line_naming_it(tmp_path):
    not_a_folder = tmp_path / "data"
    not_a_folder.write_text("")
    for command in ("run", "status"):
        with pytest.raises(SystemExit) as stopped:
            main([command, "--root", str(not_a_folder)])
        says = f"laion-assets {command}: no dataset at {not_a_folder}: it is a file"
        assert str(stopped.value.code) == says


def test_a_run_config_reads_exponent_numbers_as_the_launchpad_and_the_settings_file_do(local_root, tmp_path):
    """`eps: 2e-2` is a number to the launchpad's YAML (1.2) and in laion_assets.yaml, but --config (and
    $LAION_ASSETS_RUN_CONFIG) read it with PyYAML's 1.1 rules, as the string "2e-2": refused, "not valid for
    expected type Float"."""
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  duplicates:\n    config:\n      eps: 2e-2\n")
    assert main(["init", "--root", local_root, "--config", str(config)]) == 0
    written = yaml.safe_load(Path(local_root, SETTINGS_FILE).read_text())
    assert written["duplicates"]["eps"] == 0.02
