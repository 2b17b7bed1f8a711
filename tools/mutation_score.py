"""Mutation testing of the GRPO core with mutmut (docs/testing.md): runs it and prints the score.

    pip install -e ".[mutation]"
    OMP_NUM_THREADS=1 python tools/mutation_score.py            # run, then print the score
    python tools/mutation_score.py --report-only                 # score of the last run only
    python tools/mutation_score.py --survivors --fresh-stats     # after adding tests: re-run the survivors
    python tools/mutation_score.py --verify-with tests/x.py      # quicker: run the new tests on the survivors
    python tools/mutation_score.py --verify-with tests/x.py -- 'lightning_grpo.rollout.*'            # ... on some survivors
    python tools/mutation_score.py --unchecked --verify-with tests/grpo -- 'lightning_grpo.grpo.*'   # ... on unrun mutants
    python tools/mutation_score.py --generate-only               # only write mutation/mutants/ (for --unchecked --verify-with)

The core is the scope `CORE` below: `grpo/`, `samplers/`, `rollout.py`, `objectives/`, the update
path of `module.py`, the rank choreography of `distributed.py`, the guarded optimizer step of
`optimization.py` and `datamodules/streaming.py` (the mutmut settings are in pyproject.toml).
Mutants listed in tools/equivalent_mutants.txt (one `name  reason` a line) are equivalent: no test
can tell them from the original, so they leave the denominator. The last line printed is the
score: killed / (all − equivalent), over the core.

mutmut names a mutated module after its file's path below its working folder, and the tests
import callbacks/ and datamodules/ as lightning_grpo.callbacks / lightning_grpo.datamodules (the
package-dir mapping of pyproject.toml): so mutmut runs in `mutation/` (ignored by git), a copy of
the repository in the installed layout, those two folders inside lightning_grpo/, remade from the
sources before each run (plain copies that keep the files' times, so mutmut mutates again only what
changed). mutmut writes its mutants and results to mutation/mutants/.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "mutation"  # mutmut's working folder: the repository in the installed layout
MUTANTS = STAGE / "mutants"
# what the tests need besides the package (pyproject.toml: mutmut's and pytest's settings)
STAGED = {"lightning_grpo": "lightning_grpo", "callbacks": "lightning_grpo/callbacks", "datamodules": "lightning_grpo/datamodules",
          "tests": "tests", "configs": "configs", "pyproject.toml": "pyproject.toml"}
EQUIVALENT_FILE = ROOT / "tools" / "equivalent_mutants.txt"

# mutmut names a mutant <module>.x_<function>__mutmut_<n> or <module>.xǁ<Class>ǁ<method>__mutmut_<n>
_MODULE_UPDATE_PATH = ("_select", "_update", "_optimizer_step", "_column_seed")
# the rank choreography of a step (distributed.py's last section) and the guarded optimizer step
_CHOREOGRAPHY = ("select_for_update", "_select_spanning", "optimizer_steps", "check_divides", "counts_may_differ", "update_schedule")
CORE = [
    "lightning_grpo.grpo.*",
    "lightning_grpo.samplers.*",
    "lightning_grpo.rollout.*",
    "lightning_grpo.datamodules.streaming.*",
    "lightning_grpo.objectives.*",
    *(f"lightning_grpo.module.xǁGRPOModuleǁ{name}__mutmut_*" for name in _MODULE_UPDATE_PATH),
    *(f"lightning_grpo.distributed.x_{name}__mutmut_*" for name in _CHOREOGRAPHY),
    "lightning_grpo.optimization.x_guarded_step__mutmut_*",
    "lightning_grpo.optimization.x_gradient_norm__mutmut_*",
]
KILLED = {"killed", "timeout", "caught by type check", "segfault", "killed (verified)"}
VERIFIED_FILE = MUTANTS / "verified_kills.json"


def stage_sources() -> None:
    """Remake mutation/ from the sources: lightning_grpo/ with callbacks/ and datamodules/ inside it
    (as the wheel installs them), tests/, configs/ and pyproject.toml. mutation/mutants/ is kept."""
    import shutil

    STAGE.mkdir(exist_ok=True)
    for source, target in STAGED.items():
        if (STAGE / target).is_dir():
            shutil.rmtree(STAGE / target)
    for source, target in STAGED.items():
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, STAGE / target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / source, STAGE / target)


def generate_mutants() -> None:
    """Write mutants/ (the mutated copies and their .meta files, every new mutant "not checked")
    without mutmut's traced stats run or any mutant run: all that `--unchecked --verify-with`
    needs. These are the first steps of `mutmut run` (mutmut 3.8 has no command for them alone);
    a source file newer than its copy is mutated again, its changed functions' results reset."""
    from mutmut import __main__ as mutmut_main

    stage_sources()
    os.chdir(STAGE)
    mutmut_main.set_mutant_under_test("mutant_generation")
    mutmut_main.copy_src_dir()
    mutmut_main.copy_also_copy_files()
    mutmut_main.setup_source_paths()
    mutmut_main.store_lines_covered_by_tests()
    print(mutmut_main.create_mutants(1))


def equivalent_mutants() -> dict[str, str]:
    """{mutant name: why it is equivalent} from tools/equivalent_mutants.txt."""
    listed: dict[str, str] = {}
    for line in EQUIVALENT_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            if not reason.strip():
                raise SystemExit(f"{EQUIVALENT_FILE}: {name} has no reason")
            listed[name] = reason.strip()
    return listed


def results() -> dict[str, str]:
    """{mutant name: mutmut status} of every core mutant mutmut has a result for."""
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all=True"], cwd=STAGE, check=True, capture_output=True, text=True)
    status = {}
    for line in out.stdout.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if match and any(fnmatch.fnmatchcase(match[1], pattern) for pattern in CORE):
            status[match[1]] = match[2].strip()
    if VERIFIED_FILE.exists():
        import json

        for name, outcome in json.loads(VERIFIED_FILE.read_text()).items():
            if status.get(name) in ("survived", "no tests", "not checked"):
                status[name] = "killed (verified)" if outcome["killed"] else "survived (verified)"
    return status


def verify(survivors: list[str], tests: list[str]) -> None:
    """Run `tests` against each survivor, the way mutmut does (its trampolines read the mutant to
    activate from MUTANT_UNDER_TEST), in one process inside mutants/; record the ones they kill.

    mutmut only runs the tests it saw calling a function when it collected its stats, so tests
    added after that run are not tried on old survivors until the stats are collected again
    (--fresh-stats, a full traced run of the suite); this checks them directly."""
    import json
    import shutil

    import pytest

    # mutmut copied tests/ into mutants/ when it last ran: bring the tests written since then along
    shutil.copytree(ROOT / "tests", MUTANTS / "tests", dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    os.chdir(MUTANTS)
    sys.path.insert(0, str(MUTANTS))
    args = [*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
    os.environ["MUTANT_UNDER_TEST"] = ""
    if pytest.main(args) != 0:
        raise SystemExit(f"the verification tests fail without a mutant: {tests}")
    verified = json.loads(VERIFIED_FILE.read_text()) if VERIFIED_FILE.exists() else {}
    for name in survivors:
        os.environ["MUTANT_UNDER_TEST"] = name
        code = pytest.main(args)
        if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.INTERRUPTED):
            raise SystemExit(f"pytest could not run the tests on {name} (exit code {code}): nothing recorded for it")
        verified[name] = {"tests": tests, "killed": code != pytest.ExitCode.OK}  # failed, or stopped collecting
        VERIFIED_FILE.write_text(json.dumps(verified, indent=1))  # after each mutant: a long run can be stopped
    os.environ.pop("MUTANT_UNDER_TEST")
    os.chdir(ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report-only", action="store_true", help="do not run mutmut, score its last results")
    parser.add_argument("--max-children", type=int, default=1, help="mutmut worker processes (default 1)")
    parser.add_argument("--survivors", action="store_true", help="re-run only the core mutants that survived the last run")
    parser.add_argument("--generate-only", action="store_true", help="only write mutation/mutants/ (no stats, no mutant run), then print the score")
    parser.add_argument("--fresh-stats", action="store_true", help="forget which tests call which function (after adding tests)")
    parser.add_argument("--verify-with", nargs="+", metavar="TEST", help="run these tests (paths under tests/) on every survivor (matching `patterns`, if given) instead of mutmut")
    parser.add_argument("--unchecked", action="store_true", help="with --verify-with: the mutants matching `patterns` that mutmut has not run yet, instead of the survivors")
    parser.add_argument("patterns", nargs="*", help="mutant name patterns to (re)run; default: the whole core")
    args = parser.parse_args()
    if args.generate_only:
        generate_mutants()
        args.report_only = True
    if args.verify_with:
        status = results()
        if args.unchecked:
            chosen = [name for name, s in status.items() if s == "not checked" and any(fnmatch.fnmatchcase(name, p) for p in args.patterns)]
        else:
            chosen = [name for name, s in status.items() if s not in KILLED and s != "not checked" and name not in equivalent_mutants()
                      and (not args.patterns or any(fnmatch.fnmatchcase(name, p) for p in args.patterns))]
        verify(chosen, args.verify_with)
        args.report_only = True
    if args.survivors:
        args.patterns = [name for name, s in results().items() if s not in KILLED and s != "not checked"]
        print(f"re-running {len(args.patterns)} surviving mutants")
    if args.fresh_stats:
        (MUTANTS / "mutmut-stats.json").unlink(missing_ok=True)
    if not args.report_only:
        stage_sources()
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        env.pop("PYTHONPATH", None)  # the tests must import the mutated copy in mutants/, not the sources
        command = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children), *(args.patterns or CORE)]
        subprocess.run(command, cwd=STAGE, env=env, check=False)
    report(results(), equivalent_mutants())


def report(status: dict[str, str], listed: dict[str, str]) -> None:
    """Print the survivors, a per-file table and, last, the score killed / (killed + survived).

    A listed equivalent mutant that a test kills is not equivalent: it counts as killed, with a
    warning to take it off the list."""
    from collections import Counter

    outcome = {}
    for name, s in status.items():
        if s in KILLED:
            outcome[name] = "killed"
        elif name in listed:
            outcome[name] = "equivalent"
        else:
            outcome[name] = "unchecked" if s == "not checked" else "survived"
    for name in sorted(n for n in listed if n not in status):
        print(f"listed as equivalent but not a current mutant: {name}")
    for name in sorted(n for n in listed if outcome.get(n) == "killed"):
        print(f"listed as equivalent but killed (take it off the list): {name}")
    for name in sorted(n for n, o in outcome.items() if o == "survived"):
        print(f"survived ({status[name]}): {name}")
    table: dict[str, Counter] = {}
    for name, o in outcome.items():
        table.setdefault(name.split(".x")[0].removeprefix("lightning_grpo."), Counter())[o] += 1
    print("| module | killed | survived | equivalent | unchecked |\n|---|---|---|---|---|")
    for module in sorted(table):
        row = table[module]
        print(f"| {module} | {row['killed']} | {row['survived']} | {row['equivalent']} | {row['unchecked']} |")
    total = Counter(outcome.values())
    checked = total["killed"] + total["survived"]
    print(f"mutants: {len(status)}, not yet checked: {total['unchecked']}, killed: {total['killed']}, "
          f"equivalent: {total['equivalent']}, surviving: {total['survived']}")
    print(f"mutation score (killed / checked non-equivalent): {total['killed']}/{checked} = {100 * total['killed'] / max(checked, 1):.1f}%")


if __name__ == "__main__":
    main()
