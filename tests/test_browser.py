"""Watching a study in a real browser: ``kdsweep dashboard`` (optuna-dashboard) and TensorBoard's
HParams tab, each served on a free loopback port and loaded in headless Chromium (tests/browser.py).

The first two run on test_sweep's ``small_study``: 2 complete trials of a real sweep, its journal and the
TensorBoard events its trials wrote. What a user opens the pages for must be on them: the
study's name and trial count on the dashboard; each trial's swept hparams and its validation
loss in the HParams table. The third runs the README's plain ``optuna-dashboard`` command on a
PostgreSQL study, the password in ``PGPASSWORD`` only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from browser import chromium, free_port, rendered_text, server
from pgserver import postgres_server
from sweeprepo import study


@pytest.mark.slow
def test_dashboard_shows_the_study_and_its_trial_count_in_chromium(small_study, tmp_path):
    repo, _ = small_study
    n = len(study(repo, "small").trials)
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("kdsweep")), "dashboard", "small", "--port", str(port)]
    log = tmp_path / "dashboard.log"
    with server(cmd, f"http://127.0.0.1:{port}/api/studies", repo, log), chromium(tmp_path / "profile") as browser:
        page = f"http://127.0.0.1:{port}/dashboard/studies/0"
        text = rendered_text(browser, f"{page}/trials", ["small (id=0)", f"{n} Trials"])
        second = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=120)  # the port is taken
    assert n == 2
    assert "small (id=0)" in text and f"{n} Trials" in text, text[:2000]
    assert all(f"Trial {i} Complete" in text for i in range(n)), text[:2000]
    # What the command printed: the study, its trial count and the URL, before the server's own lines.
    assert f"dashboard: study 'small' ({n} trials) in studies/small.journal: {page} " in log.read_text()
    assert second.returncode == 2 and f"--port {port}: Address already in use" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr


@pytest.mark.slow
def test_tensorboard_hparams_tab_lists_each_trials_hparams_and_val_loss_in_chromium(small_study, tmp_path):
    repo, _ = small_study
    trials = study(repo, "small").trials
    port = free_port()
    tensorboard = str(Path(sys.executable).with_name("tensorboard"))
    cmd = [tensorboard, "--logdir", "runs/small", "--host", "127.0.0.1", "--port", str(port)]
    # TensorBoard formats the table's numbers to 5 significant digits.
    rows = [
        f"{t.number} {t.params['loss.alpha']:#.5g} forward topk_tail {t.params['loss.temperature']:#.5g}"
        for t in trials
    ]
    log = tmp_path / "tensorboard.log"
    with server(cmd, f"http://127.0.0.1:{port}/data/plugins_listing", repo, log), chromium(tmp_path / "p") as browser:
        text = rendered_text(browser, f"http://127.0.0.1:{port}/#hparams", ["hparam/val_loss", *rows])
    assert f"Number of matching session groups: {len(trials)}" in text, text[:3000]
    for row, t in zip(rows, trials):
        assert row in text, (row, text[:3000])
        assert f"{t.value:#.5g}" in text, (t.value, text[:3000])


@pytest.mark.slow
def test_optuna_dashboard_on_a_postgresql_url_without_its_password_shows_the_study(tmp_path, monkeypatch):
    with postgres_server() as pg:
        s = optuna.create_study(study_name="pg-watch", storage=pg.url)
        s.optimize(lambda t: t.suggest_float("loss.alpha", 0.1, 0.9), n_trials=3)
        port = free_port()
        url = f"postgresql+psycopg://{pg.user}@{pg.host}:{pg.port}/{pg.database}"  # the README's form
        cmd = [str(Path(sys.executable).with_name("optuna-dashboard")), url, "--port", str(port), "--quiet"]
        monkeypatch.setenv("PGPASSWORD", pg.password)  # the server process inherits it
        api = f"http://127.0.0.1:{port}/api/studies"
        with server(cmd, api, tmp_path, tmp_path / "dash.log"), chromium(tmp_path / "profile") as browser:
            page = f"http://127.0.0.1:{port}/dashboard/studies/{s._study_id}/trials"
            text = rendered_text(browser, page, ["pg-watch (id=", "3 Trials"])
    assert "pg-watch (id=" in text and "3 Trials" in text, text[:2000]
