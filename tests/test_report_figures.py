"""The figures of ``switchrl report``: an RL run's training curves, the accuracy-switches frontier and
accuracy against seconds, embedded as PNGs that decode; and the page in headless Chromium when present."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import subprocess

import pytest
from PIL import Image

from switchrl.report import main, write_report
from switchrl.report_figures import CURVES, curve_points, load_rl_history
from switchrl.trainers.rl import train
from tests.test_eval import make_config
from tests.test_grpo import rl_section

STEPS = 3


def images(page: str) -> list[Image.Image]:
    """Every embedded PNG of ``page``, decoded."""
    chunks = page.split('src="data:image/png;base64,')[1:]
    return [Image.open(io.BytesIO(base64.b64decode(c.split('"')[0]))) for c in chunks]


@pytest.fixture(scope="module")
def runs(tiny_family, tmp_path_factory):
    """A 3-step PPO run and an eval of it (by ``eval.rl_path``) beside random switching."""
    root = tmp_path_factory.mktemp("figures")
    config = make_config(tiny_family, root, systems=["random", "rl"], seeds=[0])
    config.tasks = [config.tasks[0].model_copy(update={"allow_overlap": True})]  # train on the test rows
    rl = rl_section(tiny_family, root, base=str(tiny_family[2]), steps=STEPS, save_steps=STEPS)
    train(config, "ppo", rl)
    config.eval = config.eval.model_copy(update={"rl_path": str(root / "rl" / "switcher")})
    from switchrl.eval import evaluate

    return root / "rl", evaluate(config, progress=False).out_dir


def test_rl_run_page_has_one_point_per_logged_step_of_each_curve(runs, capsys):
    rl_dir, _ = runs
    assert main(argparse.Namespace(run_dir=str(rl_dir))) == 0
    page = (rl_dir / "report.html").read_text()
    (figure,) = images(page)
    figure.load()
    assert figure.format == "PNG" and figure.width >= 800 and 200 <= figure.height <= 600
    algo, history = load_rl_history(rl_dir / "rl_log.json")
    assert algo == "ppo" and [h["step"] for h in history] == list(range(1, STEPS + 1))
    for key, _title in CURVES:  # PPO logs all four (the zero-variance share is new)
        points = curve_points(history, key)
        assert [p[0] for p in points] == [1.0, 2.0, 3.0], key
    assert all(0 <= v <= 1 for _, v in curve_points(history, "frac_reward_zero_std"))
    assert "not logged" not in page and f"ppo, {STEPS} logged steps" in page


def test_eval_page_draws_frontier_seconds_and_the_named_rl_runs_curves(runs):
    _, eval_dir = runs
    page = write_report(eval_dir).read_text()
    for title in (
        "Share of patches per checkpoint",
        "Accuracy against switches per response",
        "Accuracy against seconds per response",
        f"Training curves · rl (ppo, {STEPS} logged steps)",
    ):
        assert f"<h2>{title}</h2>" in page
    figures = images(page)
    assert len(figures) == 4
    for figure in figures:
        figure.load()  # decodes in full
        assert 300 <= figure.width <= 2000 and 200 <= figure.height <= 800
        assert len(set(figure.convert("L").getdata())) > 10  # drawn on, not blank
    assert "http" not in page.replace("http-equiv", "")  # still self-contained


def test_sb3_entropy_is_read_from_its_entropy_loss():
    history = [{"step": 64, "train/entropy_loss": -1.0}, {"step": 128, "train/entropy_loss": -0.5}]
    assert curve_points(history, "entropy") == [(64.0, 1.0), (128.0, 0.5)]
    assert curve_points(history, "frac_reward_zero_std") == []


def test_rl_log_that_is_not_json_is_a_clear_error(tmp_path):
    (tmp_path / "rl_log.json").write_text("{not json")
    from switchrl.errors import CheckpointError

    with pytest.raises(CheckpointError, match="cannot read the RL log"):
        write_report(tmp_path)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not on PATH (apt-get install chromium)")
def test_the_page_renders_in_headless_chromium(runs, tmp_path):
    _, eval_dir = runs
    page = write_report(eval_dir)
    shot = tmp_path / "page.png"
    subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,2400",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        gray = image.convert("L")
        assert len(set(gray.getdata())) > 50  # text and figures, not an empty or error page
        results = json.loads((eval_dir / "results.json").read_text())
        assert results["metrics"]  # the page it drew has the comparison and the figures


def test_grpo_logs_every_curve_at_every_step(tiny_family, tmp_path):
    """GRPO's curves come from TRL's own log (reward, entropy, frac_reward_zero_std) and ours (switch rate)."""
    from tests.test_grpo import make_config as grpo_config

    result = train(grpo_config(tiny_family, tmp_path), "grpo", rl_section(tiny_family, tmp_path, steps=2))
    algo, history = load_rl_history(result.out_dir / "rl_log.json")
    assert algo == "grpo"
    for key, _title in CURVES:
        assert [p[0] for p in curve_points(history, key)] == [1.0, 2.0], key
    (figure,) = images(write_report(result.out_dir).read_text())
    figure.load()
    assert figure.width >= 800
