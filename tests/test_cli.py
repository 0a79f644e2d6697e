"""peft_sara.script_utils.cli: one-line user errors, and logs printed by the main process only."""

from __future__ import annotations

import logging

import pytest

from peft_sara.script_utils.cli import UserInputError, get_logger, run_main


def test_a_user_error_is_one_line_and_exit_status_2(capsys):
    def main(argv):
        raise UserInputError("--resolution must be a positive multiple of 8, got 7.")

    with pytest.raises(SystemExit) as stop:
        run_main(main)
    assert stop.value.code == 2
    assert capsys.readouterr().err == "error: --resolution must be a positive multiple of 8, got 7.\n"


def test_logs_come_from_the_main_process_only_also_before_accelerate_exists(monkeypatch, caplog):
    logger = get_logger("peft_sara.tests.cli")
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("RANK", "1")
    logger.warning("from the second process")
    monkeypatch.setenv("RANK", "0")
    logger.warning("from the main process")
    monkeypatch.delenv("RANK")
    logger.warning("from a single process")
    assert [record.message for record in caplog.records] == ["from the main process", "from a single process"]
    assert get_logger("peft_sara.tests.cli").filters == logger.filters  # one filter, however often it is asked for


def test_only_the_main_process_prints_the_error_line(monkeypatch, capsys):
    def main(argv):
        raise UserInputError("bad flag")

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as stop:
        run_main(main)
    assert stop.value.code == 2 and capsys.readouterr().err == ""
