"""The README's TensorBoard tag table against the event files of real runs, both ways.

Every tag the table documents is in the event files of a default (`make train`) run with the
options that turn on the optional families, read back with TensorBoard's own event reader; and
every tag in those files matches a row of the table, so the README stays complete.
"""

import re
from pathlib import Path

import pytest
from conftest import ROOT, compose_config
from hydra.core.global_hydra import GlobalHydra
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

from gradwatch.train import train

README = ROOT / "README.md"
# How the table's placeholders are expanded (presence) and matched (completeness).
LAYERS, PARAMS, NORMS = ("fc1", "fc2"), ("weight", "bias"), ("inf",)
PLACEHOLDERS = {"<layer>": r"fc\d+", "<param>": r"(?:weight|bias)", "<p>": r"[^/]+"}
# The run: the tutorial's, short, with every optional family on. 300 steps logged every 10:
# histograms at steps 99, 199, 299, and the stall alert (the tutorial's) fires at step 229.
DEFAULT_RUN = (
    "trainer.max_epochs=300",
    "trainer.log_every_n_steps=10",
    "callbacks.gradient_monitor.norm_types=[2,inf]",
    "trainer.gradient_clip_val=1.0",
    # The tutorial's tensors (1 to 4 values) are under the default minimum for a histogram.
    "callbacks.gradient_monitor.histogram_min_values=1",
    "callbacks.gradient_monitor.activation_histograms=true",
)
# Rows written only when something is wrong, so absent from a healthy run; test_monitor.py checks
# that a run with NaN gradients writes them.
# The spike tags likewise (test_every_step.py writes them from injected spikes).
ONLY_WHEN_UNHEALTHY = (
    "grad_nonfinite/<layer>",
    "grad_nonfinite/total",
    "spike/grad_norm",
    "spike/loss",
    "spike/skipped_steps",
)
# Written for 16-bit weights only (the tutorial's are float32); test_monitor.py checks them.
ONLY_IN_16_BIT = ("update_rounded_away/<layer>",)
# val/loss and val/acc exist only for a dataset with a held-out split: xor has none.
VAL_RUN = ("data=moons", "model.loss=bce_with_logits", "trainer.max_epochs=50")


def section(title: str) -> str:
    """The README's text under `## title`, up to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def tag_table(title: str | None = None) -> list[list[str]]:
    """The tag tables (each headed `| tag | what |`) of the TensorBoard and Diagnosis sections
    (or of the section ``title``): per row, the backquoted names of its first cell, e.g.
    ["train/loss", "train/acc"], ["alerts"], ["final/*"]."""
    if title is None:
        return tag_table("TensorBoard") + tag_table("Diagnosis: what is wrong, where, and the fix")
    lines = section(title).splitlines()
    start = lines.index("| tag | what |")
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        assert line.startswith("| `"), f"a tag row without a `tag`: {line}"
        first_cell = line.split(" | ")[0]
        rows.append(re.findall(r"`([^`]+)`", first_cell))
    return rows


def pattern_regex(pattern: str) -> str:
    regex = re.escape(pattern)
    for placeholder, sub in PLACEHOLDERS.items():
        regex = regex.replace(re.escape(placeholder), sub)
    return regex.replace(re.escape("..."), ".+").replace(re.escape("*"), ".+")


def expand(pattern: str) -> list[str]:
    """Concrete regexes for the presence check: every layer, param and norm named above."""
    out = [pattern]
    # The output layer feeds no other layer: only the hidden one has activation statistics.
    layers = ("fc1",) if pattern.startswith("activation") else LAYERS
    for placeholder, values in (("<layer>", layers), ("<param>", PARAMS), ("<p>", NORMS)):
        if placeholder in pattern:
            out = [o.replace(placeholder, v) for o in out for v in values]
    return [pattern_regex(o) for o in out]


def plugin_of(pattern: str) -> str:
    """Which TensorBoard plugin (tab) holds a documented tag."""
    if "_hist/" in pattern:
        return "histograms"
    if pattern == "custom_scalars__config__":
        return "custom_scalars"
    return "text" if pattern == "alerts" else "scalars"


def event_tags(run_dir: Path) -> dict[str, set[str]]:
    """Every tag of the run's event files, by plugin: scalars, histograms, text, hparams."""
    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    tags: dict[str, set[str]] = {}
    for tag in acc.Tags()["tensors"]:
        plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
        # add_text("alerts", ...) is stored as alerts/text_summary; the Text tab shows it so.
        tags.setdefault(plugin, set()).add(tag.removesuffix("/text_summary"))
    return tags


def run(out: Path, *overrides: str) -> dict[str, set[str]]:
    try:
        train(compose_config(list(overrides), out))
    finally:
        GlobalHydra.instance().clear()
    return event_tags(out)


@pytest.fixture(scope="module")
def default_tags(tmp_path_factory) -> dict[str, set[str]]:
    return run(tmp_path_factory.mktemp("readme") / "run", *DEFAULT_RUN)


@pytest.fixture(scope="module")
def val_tags(tmp_path_factory) -> dict[str, set[str]]:
    return run(tmp_path_factory.mktemp("readme_val") / "run", *VAL_RUN)


def test_the_tag_table_parses():
    rows = tag_table()
    patterns = [p for row in rows for p in row]
    assert len(rows) >= 10 and "grad_norm/<layer>" in patterns and "final/*" in patterns, rows


def test_every_documented_tag_is_in_the_event_files(default_tags, val_tags):
    tags = default_tags
    both = {k: tags.get(k, set()) | val_tags.get(k, set()) for k in {*tags, *val_tags}}
    missing = []
    absent = ONLY_WHEN_UNHEALTHY + ONLY_IN_16_BIT
    for pattern in (p for row in tag_table() for p in row if p not in absent):
        # val/ rows (and whatever Lightning writes with them) only from the moons run.
        for regex in expand(pattern):
            if not any(re.fullmatch(regex, t) for t in both.get(plugin_of(pattern), ())):
                missing.append(f"{pattern} ({regex} in {plugin_of(pattern)})")
    assert not missing, f"documented in README.md, not in the event files: {missing}"
    # `grad_norm_<p>/...` is "the same" as grad_norm/: the same tags (the clipped total aside).
    l2 = {t.removeprefix("grad_norm/") for t in tags["scalars"] if t.startswith("grad_norm/")}
    inf = {
        t.removeprefix("grad_norm_inf/") for t in tags["scalars"] if t.startswith("grad_norm_inf/")
    }
    assert inf == l2 - {"total_clipped"}
    # The HParams tab: the row says so, and the plugin's summaries are there.
    assert any(
        "HParams" in line for line in section("TensorBoard").splitlines() if "`final/" in line
    )
    assert "_hparams_/experiment" in tags.get("hparams", set())


def test_every_tag_in_the_event_files_is_documented(default_tags, val_tags):
    patterns = [p for row in tag_table() for p in row]
    undocumented = []
    for tags in (default_tags, val_tags):
        for plugin, names in tags.items():
            if plugin == "hparams":
                continue  # the HParams tab, documented with final/* (checked above)
            for tag in sorted(names):
                if not any(
                    plugin_of(p) == plugin and re.fullmatch(pattern_regex(p), tag) for p in patterns
                ):
                    undocumented.append(f"{plugin}: {tag}")
    assert not undocumented, f"in the event files, not in README.md's tag table: {undocumented}"


def test_two_commands_are_make_train_and_make_test():
    block = re.search(r"```bash\n(.*?)```", section("Two commands"), re.S)
    assert block, "no ```bash block under ## Two commands"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert [c for c in commands if c] == ["make train", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^train:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
