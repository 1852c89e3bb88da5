"""The prepared GPU check: run it the first time gonjax meets a GPU, commit what it writes.

    python -m benchmarks.gpu_check --manual-dir ../shared/data --out gpu_check/   # on a machine with a GPU
    python -m benchmarks.gpu_check ... --parts parity,fashion --quick              # minutes, not an hour

Each part runs in its own process, on JAX's default device (the GPU where there is one):

- **parity**: the float64 parity tests (`tests/test_parity.py -k float64`: one training step of every model
  against the PyTorch reference in float64) on that device (GONJAX_TEST_PLATFORMS, tests/conftest.py).
- **step_time**: `benchmarks.step_time --model all` (against PyTorch on the same device) for each kernel choice
  (`--kernels auto`, JAX's own primitives off the CPU, and `xla_cpu`) and each precision (`--matmul-precision
  highest`, gonjax's default, and `default`, JAX's: TF32 on Ampere and later).
- **epoch_time**: `benchmarks.epoch_time` for the GON and the Implicit GON on MNIST (the trainer's whole epoch),
  the GON also at one step per call (`--steps-per-call 1` against the default of 50): what the loop on the device saves.
- **fashion**: one epoch of `experiments.gon --dataset fashion_mnist` on the device and on the CPU
  (JAX_PLATFORMS=cpu), the same seed; the epoch-1 test SSE of both and their relative difference. Float32
  programs on different hardware do not agree to the bit, so this is a sanity check of scale, not of equality.

It writes `OUT/gpu_check.json` (every part's numbers and the device) and `OUT/gpu_check.md` (the tables), with
each part's own JSON and log beside them; OUT must not exist yet (nothing is overwritten). `--quick` uses tiny
sizes and a few steps everywhere (and the GON's epoch only): it checks that the parts run, its numbers mean
nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

PARTS = ("parity", "step_time", "epoch_time", "fashion")
KERNEL_CHOICES = ("auto", "xla_cpu")
PRECISIONS = ("highest", "default")
REPO = Path(__file__).resolve().parent.parent


def _run(command: list[str], log: Path, env: dict | None = None, timeout: int = 7200) -> int:
    """Run `command` from the repository root, its output into `log`; its exit status."""
    with open(log, "w") as handle:
        try:
            return subprocess.run(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            handle.write(f"\ngpu_check: stopped after {timeout} s\n")
            return 124


def _device() -> dict:
    """JAX's default device, asked in a process of its own (this one never initialises a backend)."""
    code = ("import json, jax; d = jax.devices()[0]; "
            "print(json.dumps({'platform': d.platform, 'kind': d.device_kind, 'count': jax.device_count(), "
            "'jax': jax.__version__}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"gpu_check: JAX could not start a device: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parity(out: Path, quick: bool) -> dict:
    selection = (["tests/test_parity.py::test_one_float64_training_step_matches_pytorch[gon]"] if quick
                 else ["tests/test_parity.py", "-k", "float64"])
    log = out / "parity.log"
    status = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], log,
                  env={"GONJAX_TEST_PLATFORMS": ""})  # "": JAX's default device
    summary = log.read_text().strip().splitlines()[-1] if log.read_text().strip() else ""
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|error|skipped)", summary)}
    return {"exit_status": status, "selection": " ".join(selection), "summary": summary, **counts}


def step_times(out: Path, quick: bool) -> dict:
    small = ["--model", "gon", "--ngf", "4", "--nz", "8", "--batch-size", "4", "--steps", "2", "--warmup", "1",
             "--eval-batches", "1", "--eval-repeats", "1"] if quick else ["--model", "all"]
    runs = {}
    for kernels in KERNEL_CHOICES:
        for precision in PRECISIONS:
            name = f"{kernels}_{precision}"
            file = out / f"step_time_{name}.json"
            status = _run([sys.executable, "-m", "benchmarks.step_time", *small, "--kernels", kernels,
                           "--matmul-precision", precision, "--json", str(file)], out / f"step_time_{name}.log")
            rows = json.loads(file.read_text())["results"] if file.is_file() else []
            runs[name] = {"exit_status": status, "rows": [
                {key: row[key] for key in ("model", "kernels", "matmul_precision", "jax_ms", "torch_ms", "speedup",
                                           "jax_compile_s", "jax_eval_images_per_s", "torch_eval_images_per_s")}
                for row in rows]}
    return runs


EPOCH_RUNS = (("gon", None), ("gon", 1), ("implicit_gon", None))  # (model, --steps-per-call; None: the default)


def epoch_times(out: Path, manual_dir: str | None, data_dir: str | None, quick: bool) -> dict:
    runs = {}
    for model, per_call in EPOCH_RUNS:
        if quick and model == "implicit_gon":  # the Implicit GON's 100 steps take minutes
            continue
        name = model if per_call is None else f"{model}_calls{per_call}"
        file = out / f"epoch_time_{name}.json"
        extra = ["--steps", "100", "--eval-batches", "1", "--ngf", "4", "--nz", "8"] if quick else (
            ["--steps", "200", "--eval-batches", "50"] if model == "implicit_gon" else [])
        extra += ["--steps-per-call", str(per_call)] if per_call is not None else []
        status = _run([sys.executable, "-m", "benchmarks.epoch_time", "--model", model, "--dataset", "mnist",
                       *_data_flags(manual_dir, data_dir), *extra, "--json", str(file)],
                      out / f"epoch_time_{name}.log")
        runs[name] = {"exit_status": status, **(json.loads(file.read_text()) if file.is_file() else {})}
    return runs


def fashion(out: Path, manual_dir: str | None, data_dir: str | None, quick: bool) -> dict:
    sizes = ["--ngf", "4", "--nz", "8", "--max-steps", "4", "--eval-batches", "2"] if quick else ["--epochs", "1"]
    found = {}
    for where, env in (("device", {}), ("cpu", {"JAX_PLATFORMS": "cpu"})):
        run = out / f"fashion_{where}"
        start = time.perf_counter()
        status = _run([sys.executable, "-m", "experiments.gon", "--dataset", "fashion_mnist",
                       *_data_flags(manual_dir, data_dir), *sizes, "--workdir", str(run)], out / f"fashion_{where}.log",
                      env=env)
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
            if (run / "metrics.jsonl").is_file() else []
        found[where] = {"exit_status": status, "seconds": round(time.perf_counter() - start, 1),
                        "step": records[-1]["step"] if records else None,
                        "test_sse": records[-1]["test_sse"] if records else None}
    a, b = found["device"]["test_sse"], found["cpu"]["test_sse"]
    found["relative_difference"] = None if a is None or b is None else abs(a - b) / abs(b)
    return found


def _data_flags(manual_dir: str | None, data_dir: str | None) -> list[str]:
    return [*(["--manual-dir", manual_dir] if manual_dir else []), *(["--data-dir", data_dir] if data_dir else [])]


def markdown(report: dict) -> str:
    """The tables of a report, for benchmarks/README.md."""
    device = report["device"]
    lines = [f"# gpu_check on {device['kind']} ({device['platform']}, {device['count']} device(s)), jax "
             f"{device['jax']}{', quick: sizes too small to mean anything' if report['quick'] else ''}", ""]
    if "parity" in report:
        p = report["parity"]
        lines += ["## Float64 parity tests on the device", "", f"`pytest {p['selection']}`: {p['summary']}",
                  ""]
    if "step_time" in report:
        lines += ["## Training step, against PyTorch on the same device", "",
                  "| model | kernels | precision | jax ms | torch ms | speedup | eval img/s jax / torch |",
                  "|---|---|---|---|---|---|---|"]
        for run in report["step_time"].values():
            for r in run["rows"]:
                lines.append(f"| {r['model']} | {r['kernels']} | {r['matmul_precision']} | {r['jax_ms']:.2f} | "
                             f"{r['torch_ms']:.2f} | {r['speedup']:.2f} | {r['jax_eval_images_per_s']:.0f} / "
                             f"{r['torch_eval_images_per_s']:.0f} |")
        lines.append("")
    if "epoch_time" in report:
        lines += ["## One epoch on MNIST (benchmarks.epoch_time)", ""]
        lines += ["| run | steps per call | gonjax epoch s | PyTorch epoch s | ratio | estimated | "
                  "training ms a step: median / p90 |", "|---|---|---|---|---|---|---|"]
        for name, run in report["epoch_time"].items():
            result = run.get("result")
            if result is None:
                lines.append(f"| {name} | | failed (exit status {run['exit_status']}) | | | | |")
                continue
            epoch, steady = result["epoch_s"], result["steadiness"]
            lines.append(f"| {name} | {result['steps_per_call'] or 'default'} | {epoch['gonjax']:.2f} | "
                         f"{epoch['torch']:.2f} | {result['epoch_ratio']:.2f} | "
                         f"{'yes' if result['estimated'] else 'no'} | {steady['median_ms']:.2f} / "
                         f"{steady['p90_ms']:.2f} |")
        scanned, single = (report["epoch_time"].get(name, {}).get("result") for name in ("gon", "gon_calls1"))
        if scanned and single:  # the same run in other calls: bit for bit on this CPU (tests/test_train.py)
            a, b = scanned["gonjax"][-1]["test_metric"], single["gonjax"][-1]["test_metric"]
            lines += ["", f"The GON's last test SSE, default steps per call against one: {a!r} / {b!r} "
                          f"(relative difference {abs(a - b) / abs(b):.2e}; 0 is bit for bit)."]
        lines.append("")
    if "fashion" in report:
        f = report["fashion"]
        difference = "-" if f["relative_difference"] is None else f"{f['relative_difference']:.2e}"
        lines += ["## Fashion-MNIST GON, device against CPU", "", "| where | step | test SSE | seconds |",
                  "|---|---|---|---|"]
        for where in ("device", "cpu"):
            lines.append(f"| {where} | {f[where]['step']} | {f[where]['test_sse']} | {f[where]['seconds']} |")
        lines += ["", f"Relative difference of the test SSE: {difference}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check"), help="a new folder for the results")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--manual-dir", default=None, help="folder of the official dataset files (offline)")
    parser.add_argument("--data-dir", default=None, help="TFDS data dir")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: do the parts run?")
    args = parser.parse_args(argv)
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: choose from {', '.join(PARTS)}, got {args.parts!r}")
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new folder (results are never overwritten)")
    device = _device()
    if device["platform"] == "cpu":
        print("gpu_check: JAX's default device is the CPU; the parts run there (a GPU check needs a GPU)",
              file=sys.stderr)
    args.out.mkdir(parents=True)
    report = {"device": device, "quick": args.quick, "parts": parts}
    for part in parts:
        start = time.perf_counter()
        if part == "parity":
            report[part] = parity(args.out, args.quick)
        elif part == "step_time":
            report[part] = step_times(args.out, args.quick)
        elif part == "epoch_time":
            report[part] = epoch_times(args.out, args.manual_dir, args.data_dir, args.quick)
        else:
            report[part] = fashion(args.out, args.manual_dir, args.data_dir, args.quick)
        print(f"gpu_check: {part} done in {time.perf_counter() - start:.0f} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "gpu_check.md").write_text(text + "\n")
    print(text)
    failed = [part for part in parts if _failed(report[part])]
    if failed:
        print(f"gpu_check: these parts did not finish cleanly: {', '.join(failed)} (their logs are in {args.out})",
              file=sys.stderr)
    return 1 if failed else 0


def _failed(part: dict) -> bool:
    if "exit_status" in part:
        return part["exit_status"] != 0
    return any(_failed(value) for value in part.values() if isinstance(value, dict))


if __name__ == "__main__":
    raise SystemExit(main())
