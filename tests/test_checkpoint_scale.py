"""Checkpoints at scale: untouched pages stay untouched (a base reads only
what the snapshot holds, a restore writes only what is not zero, straight
into the snapshot), a base to S3 streams in bounded parts, progress
callbacks, and ``checkpoint ls``/``verify`` on a target with no checkpoint.
Memory is measured in a subprocess, at sizes CI can afford."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

from pagefork import PAGE_SIZE, App, Region
from pagefork import checkpoint as ck
from pagefork.cli import main as cli


# ---- no checkpoint: ls and verify agree -------------------------------------------------

@pytest.mark.parametrize("where", ["missing", "empty"])
def test_ls_and_verify_agree_on_a_target_with_no_checkpoint(tmp_path, capsys, where):
    target = tmp_path / "none"
    if where == "empty":
        target.mkdir()
    for command in ("ls", "verify"):
        assert cli(["checkpoint", command, str(target)]) == 1
        err = capsys.readouterr().err
        assert f"pagefork checkpoint {command}: no checkpoint in {target}" in err
        assert ("(it does not exist)" in err) == (where == "missing")
    assert cli(["checkpoint", "ls", str(target), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == []
    with Region(PAGE_SIZE) as region:
        ck.save(region, target)
    assert cli(["checkpoint", "ls", str(target)]) == 0
    assert cli(["checkpoint", "verify", str(target)]) == 0
