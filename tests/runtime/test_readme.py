"""The README says what a new user sees (issue 33.13): its figures are the code's, and its
commands neither overwrite tracked files nor write one output twice."""
import os
import re
import shlex
import subprocess

from helpers import REPO

README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()


def _commands() -> list[list[str]]:
    """Every command line of the README's sh blocks (comments and continuations dropped)."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line.replace("&", " "), comments=True))
    return commands


def test_the_size_search_bound_is_the_code_s():
    from sdc_runtime.codec import SIZE_SEARCH_ENCODES

    assert f"at most {SIZE_SEARCH_ENCODES} encodes" in README


def test_no_command_writes_into_a_tracked_folder():
    """Before: the sdc-bench lines wrote --out docs/bench/..., over 57 tracked files."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    targets = [os.path.normpath(words[words.index(flag) + 1]) for words in _commands()
               for flag in ("--out", "--out-dir", "--report") if flag in words[:-1]]
    assert targets
    for target in targets:
        assert not any(path.startswith(target + "/") for path in tracked), target


def test_the_use_block_writes_each_output_once():
    outputs = [words[3] for words in _commands()
               if words[:2] == ["sdc-runtime", "encode"] and len(words) > 3 and "--out-dir" not in words]
    assert outputs and len(outputs) == len(set(outputs)), outputs


def test_the_test_command_is_what_ci_runs():
    assert "```sh\n.ci/run\n```" in README
