"""Differential fuzzing of every runtime execution form against the reference, on generated graphs.

The same generator (tests/runtime/graphgen.py) and checks (tests/runtime/test_forms.py) as the CI tests
``test_forms_agree_on_generated_graphs`` and ``test_batches_agree_on_generated_graphs``, on
thousands of graphs: hypothesis draws each graph (half of them as each CI test draws them)
and a batch (1, 3, 5 or 17); the graph is compiled (iters=4, batch=8; an
Ann2SnnError is a clean refusal) and every form is read out at T = 1, 5, 9 against
``ann2snn.runtime.reference``. Outcomes are recorded, not asserted, so the run goes on;
afterwards each distinct failure (first failing form and kind of failure) is shrunk by
``hypothesis.find`` to a minimal graph, written under --save as <sha>.onnx + <sha>.npz (the
format of tests/runtime/regressions/forms/: copy a file there to make it a regression test).

Prints the command line and markdown tables: graphs generated, compiled, refused (most
common messages), what the compiled graphs hold (neurons, cumulative max pools, analog
tails, ...), disagreements per form (0 expected), forms unavailable (layered refusing a
graph, with the reasons), the kinds of failure with their minimal examples, time.

Run:  .venv/bin/python benchmarks/fuzz_forms.py --cases 2000 --seed 0 [--save build/fuzz_forms]
"""
from __future__ import annotations

import argparse
import json
import re
from random import Random
import shlex
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from common import ROOT

sys.path[:0] = [str(ROOT / "tests" / "runtime"), str(ROOT / "tests")]  # graphgen, test_forms; conftest

from hypothesis import HealthCheck, Phase, find, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ann2snn  # noqa: E402
import graphgen  # noqa: E402
from test_forms import (FORMS, SPIKING_INPUTS, SPIKING_PROFILES, TS, batch_of, check_forms,  # noqa: E402
                        compile_model, save_regression)

BATCHES = [1, 3, 5, graphgen.TEST_SAMPLES]
#: half the graphs as the CI form test draws them, half as the CI batch test does (mostly spiking)
DRAW = st.tuples(st.one_of(graphgen.cases(), graphgen.cases(profiles=SPIKING_PROFILES, input_kinds=SPIKING_INPUTS)),
                 st.sampled_from(BATCHES))


def kind_of(message: str) -> str:
    """The kind of a disagreement: 'raised KeyError', 'relative error', 'NaN', 'shape', ..."""
    if message.startswith("raised "):
        return message.split(":")[0]
    return {"relative": "relative error", "NaN": "NaN", "shape": "shape", "missing": "missing",
            "map": "map keys"}.get(message.split(" ")[0], message.split(" ")[0])


def features(snn) -> list[str]:
    """What the compiled graph holds, for the coverage rows of the table."""
    meta = json.loads({p.key: p.value for p in snn.metadata_props}["ann2snn"])
    out = ["with neurons" if meta["neurons"] else "no neuron (nothing spikes)"]
    if any(s["init"] == "zeros" for s in meta["states"]):
        out.append("with cumulative max pooling")
    if meta.get("tail"):
        out.append("with an analog tail")
    if meta["readout"]["t0"] > 0:
        out.append("with a readout delay t0 > 0")
    if len(meta["outputs"]) > 1:
        out.append("with several outputs")
    return out


def evaluate(case: graphgen.Case, batch: int) -> tuple[str, list, set[str], str, list[str]]:
    """(outcome, disagreements, unavailable forms, refusal message, features) of one drawn graph."""
    try:
        snn = compile_model(case.model, case.calib)
    except ann2snn.Ann2SnnError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        # the first line, and the first problem where the first line only announces a list
        first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
        first = re.sub(r"'[^']*'", "'...'", first)  # node and tensor names vary from graph to graph
        return "refused", [], {}, f"{type(exc).__name__}: {first[:200]}", []
    except Exception as exc:  # noqa: BLE001 - an unclean compile failure is a finding
        return "crashed", [], {}, f"{type(exc).__name__}: {str(exc)[:160]}", []
    unavailable: dict[str, str] = {}
    problems = check_forms(snn, batch_of(case.inputs, batch), TS, FORMS, unavailable)
    return ("disagreed" if problems else "agreed"), problems, unavailable, "", features(snn)


def signature(problems: list) -> tuple[str, str]:
    """What a failure is, for grouping and shrinking: the first failing form and the kind."""
    p = problems[0]
    where = "readout" if isinstance(p.T, int) else ("per step" if str(p.T).startswith("step") else "-")
    return p.form, f"{kind_of(p.message)} ({where})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2000, help="generated graphs to check (default 2000)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--save", default="build/fuzz_forms", help="folder for the minimal failing graphs")
    ap.add_argument("--shrink", type=int, default=300, help="hypothesis.find examples per failure kind (0: no shrinking)")
    args = ap.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])

    generated = Counter()
    refusals: Counter[str] = Counter()
    crashes: Counter[str] = Counter()
    per_form: Counter[str] = Counter()
    unavailable: Counter[str] = Counter()
    kinds: Counter[tuple[str, str]] = Counter()
    first_seen: dict[tuple[str, str], tuple[str, str]] = {}
    by_batch: Counter[int] = Counter()
    coverage: Counter[str] = Counter()
    layered_refusals: Counter[str] = Counter()
    start = time.perf_counter()

    @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @seed(args.seed)
    @given(DRAW)
    def run(drawn: tuple[graphgen.Case, int]) -> None:
        case, batch = drawn
        generated["graphs"] += 1
        by_batch[batch] += 1
        try:
            outcome, problems, missing, message, found = evaluate(case, batch)
        except Exception:  # noqa: BLE001 - the harness itself must not stop the run
            outcome, problems, missing, message, found = "crashed", [], {}, traceback.format_exc(limit=1)[-160:], []
        generated[outcome] += 1
        coverage.update(found)
        unavailable.update(missing.keys())
        layered_refusals.update({re.sub(r"node \S+ \(", "node (", m.split(": ", 1)[-1].split(";")[0])[:120]
                                 for m in missing.values()})
        if outcome == "refused":
            refusals[message] += 1
        elif outcome == "crashed":
            crashes[message] += 1
        for form in {p.form for p in problems}:
            per_form[form] += 1
        if problems:
            sig = signature(problems)
            kinds[sig] += 1
            first_seen.setdefault(sig, (repr(case), str(problems[0])))
        n = generated["graphs"]
        if n % 100 == 0:
            print(f"  {n} graphs, {generated['disagreed']} disagreeing, {time.perf_counter() - start:.0f} s",
                  file=sys.stderr, flush=True)

    run()
    elapsed = time.perf_counter() - start

    # shrink one minimal example per kind of failure
    minimal: dict[tuple[str, str], str] = {}
    if args.shrink and kinds:
        save = Path(args.save)
        for sig in kinds:
            def fails_so(drawn: tuple[graphgen.Case, int], sig=sig) -> bool:
                try:
                    outcome, problems, _, _, _ = evaluate(*drawn)
                except Exception:  # noqa: BLE001
                    return False
                return outcome == "disagreed" and signature(problems) == sig
            try:
                case, batch = find(DRAW, fails_so, settings=settings(
                    max_examples=args.shrink, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck)), random=Random(args.seed))
                path = save_regression(case, save)
                minimal[sig] = f"{path} (batch {batch}): {case!r}"
            except Exception as exc:  # noqa: BLE001 - not found again within the budget
                minimal[sig] = f"not reproduced by find ({type(exc).__name__}); first seen: {first_seen[sig][0]}"

    print()
    print(f"`{command}`")
    print()
    print("| | count |")
    print("|---|---:|")
    print(f"| graphs generated | {generated['graphs']} |")
    print(f"| compiled | {generated['agreed'] + generated['disagreed']} |")
    print(f"| refused (clean Ann2SnnError) | {generated['refused']} |")
    print(f"| compile crashed (not an Ann2SnnError) | {generated['crashed']} |")
    print(f"| every form agreed with the reference | {generated['agreed']} |")
    print(f"| some form disagreed | {generated['disagreed']} |")
    for what in ("with neurons", "no neuron (nothing spikes)", "with cumulative max pooling", "with an analog tail",
                 "with a readout delay t0 > 0", "with several outputs"):
        print(f"| compiled graphs {what} | {coverage[what]} |")
    print(f"| batches 1 / 3 / 5 / 17 | {' / '.join(str(by_batch[b]) for b in BATCHES)} |")
    print(f"| readouts per form and graph | T = {', '.join(map(str, TS))} |")
    print(f"| time | {elapsed:.0f} s ({elapsed / max(generated['graphs'], 1):.2f} s per graph) |")
    print()
    print("| form | graphs disagreeing | unavailable (ConfigError) |")
    print("|---|---:|---:|")
    for form in FORMS:
        print(f"| {form} | {per_form[form]} | {unavailable[form]} |")
    if per_form.get("reference"):
        print(f"| (the reference itself raised) | {per_form['reference']} | |")
    if layered_refusals:
        print()
        print("| why layered was unavailable (ConfigError) | graphs |")
        print("|---|---:|")
        for message, n in layered_refusals.most_common(5):
            print(f"| {message.replace('|', '/')} | {n} |")
    if refusals or crashes:
        print()
        print("| most common refusals / crashes | graphs |")
        print("|---|---:|")
        for message, n in (refusals + crashes).most_common(8):
            print(f"| {message.replace('|', '/')} | {n} |")
    if kinds:
        print()
        print("| failure (first form, kind) | graphs | minimal example |")
        print("|---|---:|---|")
        for sig, n in kinds.most_common():
            print(f"| {sig[0]}: {sig[1]} | {n} | {minimal.get(sig, first_seen[sig][0]).replace('|', '/')} |")
        print()
        for sig, (case, problem) in first_seen.items():
            print(f"- first seen {sig}: {case}: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
