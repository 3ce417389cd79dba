"""The Dagster UI over the demo's own instance, as a new user walks it: `laion-assets demo`, then the
`dagster dev` on the workspace the demo wrote, driven by Playwright in Debian's chromium. Screenshots of each
page land in the test's folder (and in docs/ with UPDATE_SCREENSHOT=1)."""

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import urllib3

from laion_assets import names
from laion_assets.defs.partitions import lineage_path
from laion_assets.pipeline.storage import DatasetStore
from laion_assets_tests.conftest import BROWSER_TIMEOUT_MS

SHARDS = ("synthetic-web-0", "synthetic-web-1")
DOCS = Path(__file__).parent.parent / "docs"
BIN = Path(sys.executable).parent
# The row count a partition's page shows: the latest observation's, where a removal rewrote the file
# since (its `dagster/row_count` key, "Observed in run ..."), else the shard's row in the table of the
# materialisation's shards.
SHOWN_ROW_COUNT = """shard => {
    const text = e => e.textContent.trim();
    const observed = [...document.querySelectorAll('tr')].find(
        tr => tr.querySelector('td') && text(tr.querySelector('td')) === 'dagster/row_count');
    if (observed) return text(observed.querySelectorAll('td')[1]);
    const table = [...document.querySelectorAll('table')].find(
        t => [...t.querySelectorAll('th')].some(th => text(th) === 'dagster/row_count'));
    const column = [...table.querySelectorAll('th')].map(text).indexOf('dagster/row_count');
    const row = [...table.querySelectorAll('tr')].find(
        tr => tr.querySelector('td') && text(tr.querySelector('td')) === shard);
    return text(row.querySelectorAll('td')[column]);
}"""


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A demo dataset made by the CLI, as a user makes it: (its folder, the environment it prints for the
    UI)."""
    folder = tmp_path_factory.mktemp("ui")
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "LAION_ASSETS_ROOT")}
    done = subprocess.run(
        [BIN / "laion-assets", "demo", "--images", "60"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    command = re.search(r"^  (DAGSTER_HOME=.*) (\S+/dagster) dev -w (\S+)$", done.stdout, re.M)
    assert command, done.stdout
    printed = dict(pair.split("=", 1) for pair in command[1].split())
    assert Path(command[3]) == folder / "data" / ".dagster" / "workspace.yaml"
    return folder / "data", {**env, **printed}


@pytest.fixture(scope="module")
def ui(demo) -> Iterator[str]:
    """`dagster dev` on the demo's workspace and instance, as the demo prints it: the webserver, and the
    daemon that launches the runs the UI queues."""
    root, env = demo
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workspace = root / ".dagster" / "workspace.yaml"
    log = open(root.parent / "dagster-dev.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen(
        [BIN / "dagster", "dev", "-w", workspace, "-h", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    http = urllib3.PoolManager(retries=False)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (root.parent / "dagster-dev.log").read_text()
            try:
                if http.request("GET", url + "/server_info", timeout=2).status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            assert time.monotonic() < deadline, (root.parent / "dagster-dev.log").read_text()
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()  # dagster dev stops its webserver, daemon and code servers
        server.wait(timeout=60)
        log.close()


@pytest.fixture
def page(browser, ui, tmp_path) -> Iterator[object]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(BROWSER_TIMEOUT_MS)
    yield page
    page.close()


def screenshot(page, tmp_path: Path, name: str, for_docs: bool = True) -> None:
    page.wait_for_function("() => document.getAnimations().every(a => a.playState !== 'running')")
    page.screenshot(path=str(tmp_path / name))
    if for_docs and os.environ.get("UPDATE_SCREENSHOT"):
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / name))


def instance_runs(root: Path) -> list[dg.DagsterRun]:
    """The runs of the demo's instance, read from its folder (the process's DAGSTER_HOME untouched)."""
    with dg.DagsterInstance.from_config(str(root / ".dagster")) as instance:
        return list(instance.get_runs())


def test_the_card_reads_in_the_ui_with_its_figures(page, ui, tmp_path):
    page.goto(ui + "/assets/dataset_card")
    page.get_by_text("[Show Markdown]").click()
    dialog = page.get_by_role("dialog")
    page.wait_for_function(
        "() => { const images = [...document.querySelectorAll('[role=dialog] img')];"
        " return images.length > 0 && images.every(i => i.complete); }"
    )
    widths = page.eval_on_selector_all("[role=dialog] img", "images => images.map(i => i.naturalWidth)")
    assert len(widths) >= 6 and all(width > 0 for width in widths), widths
    text = dialog.inner_text()
    assert "pretty_name:" not in text and "---" not in text.splitlines()[:3]  # no front matter
    screenshot(page, tmp_path, "ui-card.png")


def test_the_lineage_shows_every_asset_by_name(page, ui, tmp_path):
    page.goto(ui + lineage_path())
    for asset in (
        "crawl_metadata",
        "downloaded_images",
        "clip_embeddings",
        "quality_scores",
        "filtered_pairs",
        "recaptions",
        "blocklist",
        "takedowns",
        "duplicates",
        "training_shards",
        "catalog",
        "dataset_card",
        "search_index",
    ):
        page.get_by_text(asset, exact=True).last.wait_for(state="visible")
    screenshot(page, tmp_path, "ui-lineage.png")


def test_a_cli_run_is_re_executed_from_the_ui(page, ui, demo, tmp_path):
    """The demo's run that built the catalog, re-executed with the run page's button: a new run of the
    same job and asset, queued by the webserver through the code location the CLI's run recorded and
    launched by the daemon."""
    from playwright.sync_api import expect

    root, _ = demo
    runs = instance_runs(root)
    (parent,) = [
        run
        for run in runs
        if run.job_name == names.DATASET_JOB and run.asset_selection == {dg.AssetKey(names.CATALOG_ASSET)}
    ]
    assert parent.remote_job_origin.location_name == names.CODE_LOCATION
    page.goto(f"{ui}/runs/{parent.run_id}")
    button = page.get_by_role("button", name=re.compile(r"Re-execute all"))
    expect(button).to_be_enabled()  # once the page has the code location
    button.click()
    page.wait_for_url(lambda url: parent.run_id not in url)
    assert page.get_by_text("Error", exact=True).count() == 0
    child_id = page.url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 300
    while True:
        (child,) = [run for run in instance_runs(root) if run.run_id.startswith(child_id)]
        if child.is_finished or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert (child.parent_run_id, child.job_name, child.status) == (
        parent.run_id,
        names.DATASET_JOB,
        dg.DagsterRunStatus.SUCCESS,
    )
    assert child.asset_selection == parent.asset_selection
    page.reload()
    page.get_by_text("Success", exact=True).first.wait_for()
    screenshot(page, tmp_path, "ui-reexecuted-run.png")


@pytest.mark.parametrize(
    ("asset", "layer"),
    [
        ("crawl_metadata", "crawl_metadata"),
        ("downloaded_images", "images"),
        ("clip_embeddings", "embeddings"),
        ("filtered_pairs", "pairs"),
        ("recaptions", "recaptions"),
    ],
)
def test_the_row_counts_are_the_files_rows(page, ui, demo, tmp_path, asset, layer):
    root, _ = demo
    store = DatasetStore(str(root))
    for shard in SHARDS:
        page.goto(f"{ui}/assets/{asset}?view=partitions&partition={shard}")
        page.get_by_text("dagster/row_count", exact=True).first.wait_for()
        shown = page.evaluate(SHOWN_ROW_COUNT, shard)
        assert int(shown) == store.parquet_num_rows(f"{layer}/{shard}.parquet"), (asset, shard)
    screenshot(page, tmp_path, f"ui-{asset}-rows.png", for_docs=asset == "filtered_pairs")
