"""The GPU serving check's driver (run by ``benchmarks/gpu_serve_check.sh``).

On the GPU machine, with the bundle on ``PYTHONPATH``:

1. ``preflight``: imports the server path, loads SGLang's plugins and resolves the platform
   (must be ``FreeKVCudaCheckPlatform``), in a subprocess with a timeout;
2. ``model``: a random-weight model of the embedded architecture (SmolLM2-135M: the bundled
   config + tokenizer; ``LlamaForCausalLM(config)``, seed 0, bf16, ``save_pretrained``);
3. one real SGLang server per run (``--kv-policy default``, then ``freekv``), each with
   - ``equivalence``: greedy token ids (and top-2 log-probs) for prompts whose prompt +
     output fits FreeKV's budget, so FreeKV keeps the whole context on the device;
   - ``decode``: decode tok/s of one ~16K-token request (FreeKV budget 2048), from the
     stream's token timestamps, after a warm-up request;
   - the start-up lines (``freekv:``, memory, FlashInfer JIT builds, the stub) from its log;
4. optional runs while time is left (``--extra``): FreeKV with a budget over 16K (the whole
   16K context on device: equivalence at 16K), and default with CUDA graphs on.

Every step records its result (or its error and the log tail) in ``$OUT/summary.json``,
rewritten after each step, so a failure or a timeout loses nothing already measured.
``--dry-run`` does everything up to the first GPU step on a machine without one.
Outputs (at most 8 files): ``summary.json``, ``server_<run>.log`` per run, ``preflight.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]



@dataclass(frozen=True)
class Sizes:
    decode_context: int  # prompt tokens of the decode-speed request (and of equivalence_16k)
    decode_new_tokens: int
    equiv_prompts: tuple[int, ...]  # each + equiv_new_tokens <= freekv budget: all on device
    equiv_new_tokens: int
    freekv: dict[str, Any]  # --freekv-config of the sparse run
    freekv_dense: dict[str, Any]  # budget > decode_context + equiv_new_tokens
    max_total_tokens: int  # default policy's pool (bounded: fast start)
    warmup: tuple[int, int] = (512, 16)  # prompt, new tokens of the decode warm-up request


GPU_SIZES = Sizes(16384, 128, (64, 700, 1900), 48,
                  {"budget": 2048, "sink": 512, "window": 512, "host_memory_gb": 4},
                  {"budget": 18432, "sink": 512, "window": 512, "host_memory_gb": 4}, 262144)
# --rehearsal: the same driver against CPU servers (product CPU platform), small sizes; checks
# the driver's HTTP handling before GPU time is spent on it.
REHEARSAL_SIZES = Sizes(384, 6, (32, 200), 6,
                        {"budget": 256, "sink": 64, "window": 128, "host_memory_gb": 1},
                        {"budget": 512, "sink": 64, "window": 128, "host_memory_gb": 1}, 65536,
                        warmup=(32, 2))
S = GPU_SIZES
PID_FILE = Path("/tmp/freekv_serve_check.pgids")  # the shell kills these groups at the end
SERVER_READY_S = 240  # per server: imports, weights, FlashInfer load, the store_cache JIT
LOG_LINES = re.compile(
    r"freekv|FreeKV|KV Cache is allocated|max_total_num_tokens|Memory pool|mem usage|avail mem"
    r"|Load weight|Building JIT module|sgl_kernel stub|freekv_gpu_check|platform|Capture"
    r"|Traceback|Error|error:|refused",
)


def log(msg: str) -> None:
    print(f"[serve_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def launch_args(model: str, policy: str, freekv_config: dict | None, port: int,
                graphs: bool = False, flags: tuple[str, ...] = ()) -> list[str]:
    """``sglang.launch_server`` flags of one run (the import check resolves these too)."""
    argv = [
        "--model-path", model, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--random-seed", "0", "--kv-policy", policy,
        "--sampling-backend", "pytorch", "--log-level", "info",
        "--max-running-requests", "8", "--mem-fraction-static", "0.6",
    ]
    if freekv_config is not None:
        argv += ["--freekv-config", json.dumps(freekv_config)]
    else:
        argv += ["--max-total-tokens", str(S.max_total_tokens)]  # bounded pool: fast start
    if not graphs:
        argv += ["--disable-cuda-graph"]
    return argv + list(flags)


@dataclass
class Check:
    out: Path
    deadline: float
    summary: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.time() - self.summary["started"], 1)
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "summary.json")

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one step; its result or error lands in the summary either way."""
        t0 = time.time()
        log(f"step {name} ({self.left():.0f} s left)")
        entry: dict[str, Any] = {}
        self.summary["steps"][name] = entry
        try:
            entry["result"] = fn()
            entry["ok"] = True
        except BaseException as exc:  # noqa: BLE001 - recorded, the next step still runs
            entry["ok"] = False
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["trace"] = traceback.format_exc()[-3000:]
            log(f"step {name} FAILED: {entry['error']}")
            if isinstance(exc, KeyboardInterrupt):
                raise
        entry["seconds"] = round(time.time() - t0, 1)
        self.save()
        return entry.get("result")


# -- environment -----------------------------------------------------------------------------


def environment(bundle_json: Path | None) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0]}
    for mod in ("torch", "triton", "transformers", "sglang", "flashinfer", "tvm_ffi"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"unavailable: {type(exc).__name__}: {exc}"
    try:
        import torch

        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name()
            info["capability"] = list(torch.cuda.get_device_capability())
            info["device_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception as exc:  # noqa: BLE001
        info["cuda"] = repr(exc)
    nvcc = shutil.which("nvcc")
    info["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] if nvcc else None
    info["ninja"] = shutil.which("ninja")
    info["env"] = {k: v for k, v in os.environ.items()
                   if k.startswith(("SGLANG_", "FREEKV_", "FLASHINFER_", "TVM_FFI_", "CUDA_HOME"))}
    if bundle_json and bundle_json.exists():
        b = json.loads(bundle_json.read_text())
        info["bundle"] = {k: b.get(k) for k in ("built_at", "git_commit", "out_mib", "site_tar_sha256")}
        aot = b.get("flashinfer_aot") or {}
        info["bundle"]["flashinfer_aot"] = {k: v.get("name") for k, v in aot.get("modules", {}).items() if "so" in v}
    return info


PREFLIGHT = r"""
import os, sys, time; t0 = time.time()
if os.environ.get("FREEKV_FAKE_CUDA") == "1":  # dry run on a machine without a GPU
    sys.path.insert(0, os.environ["FREEKV_BUNDLE_SRC"])
    import fake_cuda; fake_cuda.install()
import torch, sglang, flashinfer
import sgl_kernel; assert getattr(sgl_kernel, "IS_FREEKV_STUB", False), sgl_kernel
import sglang.srt.entrypoints.http_server, sglang.srt.managers.scheduler
import sglang.srt.model_executor.model_runner, sglang.srt.models.llama
import sglang.srt.layers.attention.flashinfer_backend
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.platforms import current_platform
name = type(current_platform).__name__
print("platform", name, "device", current_platform.device_type, "oot", current_platform.is_out_of_tree())
import flashinfer.jit.env as e
print("flashinfer aot dir", e.FLASHINFER_AOT_DIR, sorted(p.name for p in e.FLASHINFER_AOT_DIR.glob("*")) if e.FLASHINFER_AOT_DIR.exists() else [])
print("imports_s", round(time.time() - t0, 1))
assert name == "FreeKVCudaCheckPlatform", name
"""


def preflight(out: Path, timeout: float) -> dict[str, Any]:
    logf = out / "preflight.log"
    env = dict(os.environ, FREEKV_BUNDLE_SRC=str(HERE))
    with open(logf, "w") as f:
        rc = subprocess.run([sys.executable, "-c", PREFLIGHT], stdout=f, stderr=subprocess.STDOUT,
                            timeout=timeout, env=env).returncode
    text = logf.read_text()
    if rc != 0:
        raise RuntimeError(f"preflight exited {rc}: {text[-2500:]}")
    return {"output": [ln for ln in text.splitlines() if ln.startswith(("platform", "flashinfer aot", "imports_s"))]}


# -- the model -------------------------------------------------------------------------------


def make_model(src: Path, dst: Path, seed: int = 0) -> dict[str, Any]:
    """Random bf16 weights of the bundled config; tokenizer files copied alongside."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.time()
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    config = AutoConfig.from_pretrained(src)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    except TypeError:  # transformers without the `dtype` keyword
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(dst, safe_serialization=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            shutil.copy2(f, dst / f.name)
    # save_pretrained rewrote config.json; keep the bundled one (architecture, positions).
    shutil.copy2(src / "config.json", dst / "config.json")
    return {
        "path": str(dst),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "files": sorted(p.name for p in dst.iterdir()),
        "seconds": round(time.time() - t0, 1),
    }


# -- servers ---------------------------------------------------------------------------------


class Server:
    def __init__(self, label: str, argv: list[str], port: int, out: Path, env: dict[str, str],
                 deadline: float = float("inf")):
        self.label = label
        self.deadline = deadline  # requests never wait past it (a hung run must not eat the rest)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = out / f"server_{label}.log"
        self.cmd = [sys.executable, "-m", "sglang.launch_server", *argv]
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, ready_timeout: float) -> float:
        import requests

        t0 = time.time()
        with open(self.log_path, "w") as f:
            f.write("$ " + " ".join(self.cmd) + "\n")
            f.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        with open(PID_FILE, "a") as f:
            f.write(f"{self.proc.pid}\n")
        while time.time() - t0 < ready_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.label} exited with {self.proc.returncode} "
                                   f"during start-up; log tail:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health_generate", timeout=20).status_code == 200:
                    return round(time.time() - t0, 1)
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"server {self.label} not ready after {ready_timeout:.0f} s; "
                           f"log tail:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def startup_lines(self, limit: int = 80) -> list[str]:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [ln[:400] for ln in lines
                if LOG_LINES.search(ln) and "warnings.warn" not in ln and "UserWarning" not in ln][:limit]

    def _timeout(self, timeout: float) -> tuple[float, float]:
        return (10.0, max(10.0, min(timeout, self.deadline - time.time() - 10)))

    def generate(self, input_ids: list[int], max_new_tokens: int, timeout: float,
                 logprobs: bool = False, ignore_eos: bool = True) -> dict[str, Any]:
        import requests

        payload: dict[str, Any] = {
            "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                "ignore_eos": ignore_eos},
        }
        if logprobs:
            payload.update({"return_logprob": True, "top_logprobs_num": 2,
                            "logprob_start_len": len(input_ids) - 1})
        r = requests.post(f"{self.url}/generate", json=payload, timeout=self._timeout(timeout))
        if r.status_code != 200:
            raise RuntimeError(f"/generate HTTP {r.status_code}: {r.text[:500]}")
        return r.json()

    def stream_decode(self, input_ids: list[int], max_new_tokens: int, timeout: float) -> dict[str, Any]:
        """One streamed greedy request; decode tok/s from the chunks' arrival times."""
        import requests

        payload = {"input_ids": input_ids, "stream": True,
                   "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0,
                                       "ignore_eos": True}}
        t0 = time.time()
        marks: list[tuple[float, int]] = []
        with requests.post(f"{self.url}/generate", json=payload, stream=True,
                           timeout=self._timeout(timeout)) as r:
            if r.status_code != 200:
                raise RuntimeError(f"/generate HTTP {r.status_code}: {r.text[:500]}")
            for raw in r.iter_lines():
                if not raw or not raw.startswith(b"data:"):
                    continue
                data = raw[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                n = chunk.get("meta_info", {}).get("completion_tokens")
                if n is not None:
                    marks.append((time.time(), int(n)))
        if len(marks) < 2:
            raise RuntimeError(f"stream returned {len(marks)} chunks")
        (t_first, n_first), (t_last, n_last) = marks[0], marks[-1]
        return {
            "prompt_tokens": len(input_ids),
            "new_tokens": n_last,
            "ttft_s": round(t_first - t0, 3),
            "decode_tok_s": round((n_last - n_first) / max(t_last - t_first, 1e-9), 2),
            "total_s": round(t_last - t0, 2),
        }


def prompt_ids(length: int, seed: int, vocab: int = 49152) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, vocab) for _ in range(length)]  # skip special ids at the bottom


def equivalence_requests(server: Server, lengths: tuple[int, ...], new_tokens: int,
                         seed: int) -> list[dict[str, Any]]:
    results = []
    for i, n in enumerate(lengths):
        # Distinct seeds per workload: no prompt shares a prefix with an earlier one, so no
        # run takes a radix-cache path the other run does not.
        r = server.generate(prompt_ids(n, seed=seed + i), new_tokens, timeout=600, logprobs=True)
        meta = r.get("meta_info", {})
        toks = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs") or []
        results.append({
            "prompt_tokens": n,
            "output_ids": [t[1] for t in toks] or r.get("output_ids"),
            "logprobs": [round(t[0], 5) if t[0] is not None else None for t in toks],
            "top2_gap": [round(tp[0][0] - tp[1][0], 5) if tp and len(tp) > 1 and tp[1][0] is not None
                         else None for tp in tops],
        })
    return results


def run_server_workload(check: Check, label: str, argv: list[str], port: int, env: dict[str, str],
                        workload: dict[str, Any]) -> dict[str, Any]:
    server = Server(label, argv, port, check.out, env, deadline=check.deadline)
    res: dict[str, Any] = {"argv": argv}
    check.summary["runs"][label] = res
    try:
        res["ready_s"] = server.start(min(SERVER_READY_S, max(check.left() - 30, 30)))
        log(f"{label}: ready in {res['ready_s']} s")
        check.save()
        for key, seed in (("equivalence", 1000), ("equivalence_16k", 5000)):
            if workload.get(key):
                res[key] = _guard(lambda: equivalence_requests(
                    server, workload[key], S.equiv_new_tokens, seed))
                check.save()
        if workload.get("decode"):
            def decode() -> dict[str, Any]:
                server.stream_decode(prompt_ids(S.warmup[0], seed=7), S.warmup[1], timeout=600)
                runs = [server.stream_decode(prompt_ids(workload["decode"], seed=2000 + k),
                                             S.decode_new_tokens, timeout=600) for k in range(2)]
                return {"runs": runs, "decode_tok_s": max(r["decode_tok_s"] for r in runs)}
            res["decode"] = _guard(decode)
            check.save()
        res["alive_after"] = server.proc is not None and server.proc.poll() is None
        failed = [k for k in ("equivalence", "equivalence_16k", "decode")
                  if isinstance(res.get(k), dict) and "error" in res[k]]
        if failed:
            res["failed_requests"] = failed
        if failed or not res["alive_after"]:
            res["log_tail"] = server.tail()
    except BaseException as exc:  # noqa: BLE001 - recorded with the log tail
        res["error"] = f"{type(exc).__name__}: {str(exc)[:4000]}"
        res["log_tail"] = server.tail()
        log(f"{label}: FAILED: {res['error'][:300]}")
        if isinstance(exc, KeyboardInterrupt):
            raise
    finally:
        server.stop()
        res["startup_lines"] = server.startup_lines()
        check.save()
    if "error" in res:
        raise RuntimeError(res["error"][:1000])
    return {k: v for k, v in res.items() if k in ("ready_s", "alive_after")}


def _guard(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a failed request must not hide the others
        return {"error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                "trace": traceback.format_exc()[-2000:]}


def _decode_ratio(d: dict[str, Any], f: dict[str, Any]) -> dict[str, Any] | None:
    d, f = d.get("decode") or {}, f.get("decode") or {}
    if "decode_tok_s" not in d or "decode_tok_s" not in f:
        return None
    return {"default_tok_s": d["decode_tok_s"], "freekv_tok_s": f["decode_tok_s"],
            "freekv_vs_default": round(f["decode_tok_s"] / d["decode_tok_s"], 3)}


def make_verdict(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers: equivalence at budget >= context, decode tok/s ratio per backend."""
    verdict: dict[str, Any] = {}
    for a, b, suffix in (("default", "freekv", ""), ("default_triton", "freekv_triton", "_triton")):
        if a in runs and b in runs:
            verdict[f"equivalence_budget_ge_context{suffix}"] = compare(
                runs[a].get("equivalence"), runs[b].get("equivalence"))
            ratio = _decode_ratio(runs[a], runs[b])
            if ratio is not None:
                verdict[f"decode_16k{suffix}"] = ratio
    if "default" in runs and "equivalence_16k" in runs.get("freekv_dense16k", {}):
        verdict["equivalence_16k_budget_ge_context"] = compare(
            runs["default"].get("equivalence_16k"), runs["freekv_dense16k"]["equivalence_16k"])
    failed = {k: v["error"][:300] for k, v in runs.items() if isinstance(v, dict) and "error" in v}
    failed.update({k: "requests failed: " + ", ".join(v["failed_requests"]) for k, v in runs.items()
                   if isinstance(v, dict) and v.get("failed_requests") and k not in failed})
    if failed:
        verdict["failed_runs"] = failed
    return verdict


def compare(a: list[dict[str, Any]] | Any, b: list[dict[str, Any]] | Any) -> dict[str, Any]:
    """Greedy token ids of two runs, prompt by prompt; at a divergence, the top-2 gap there."""
    if not isinstance(a, list) or not isinstance(b, list):
        return {"comparable": False, "why": "a run has no equivalence results"}
    prompts = []
    for x, y in zip(a, b):
        ia, ib = x.get("output_ids") or [], y.get("output_ids") or []
        div = next((i for i, (p, q) in enumerate(zip(ia, ib)) if p != q), None)
        common = div if div is not None else min(len(ia), len(ib))
        lp = [abs(p - q) for p, q in zip(x["logprobs"][:common], y["logprobs"][:common])
              if p is not None and q is not None]
        entry = {"prompt_tokens": x["prompt_tokens"], "identical": ia == ib and bool(ia),
                 "first_divergence": div, "max_abs_logprob_diff": round(max(lp), 5) if lp else None}
        if div is not None:
            entry["top2_gap_at_divergence"] = [x["top2_gap"][div] if div < len(x["top2_gap"]) else None,
                                               y["top2_gap"][div] if div < len(y["top2_gap"]) else None]
        prompts.append(entry)
    return {"comparable": True, "all_identical": all(p["identical"] for p in prompts),
            "prompts": prompts}


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model-src", required=True, help="bundled config + tokenizer folder")
    parser.add_argument("--model-dir", default="/tmp/freekv_check_model")
    parser.add_argument("--budget-s", type=float, default=480, help="time for this driver")
    parser.add_argument("--bundle-json", default=None)
    parser.add_argument("--runs", default="default,freekv", help="comma-separated; see RUNS")
    parser.add_argument("--extra", default="freekv_dense16k,default_graphs",
                        help="optional runs, each only while enough time is left")
    parser.add_argument("--dry-run", action="store_true", help="stop before the first GPU step")
    parser.add_argument("--rehearsal", action="store_true",
                        help="small sizes, CPU servers allowed (checks this driver, not the GPU)")
    args = parser.parse_args()
    global S, RUNS
    if args.rehearsal:
        S, RUNS = REHEARSAL_SIZES, make_runs(REHEARSAL_SIZES)

    def _terminate(signum: int, frame: Any) -> None:
        # `timeout` sends SIGTERM: unwind so every server's `finally: stop()` runs.
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out=out, deadline=time.time() + args.budget_s,
                  summary={"started": time.time(), "dry_run": args.dry_run,
                           "rehearsal": args.rehearsal, "sizes": S.__dict__, "steps": {}, "runs": {}})
    check.summary["environment"] = environment(Path(args.bundle_json) if args.bundle_json else None)
    check.save()
    if os.environ.get("SERVE_CHECK_PREFLIGHT", "1") != "0" and not args.rehearsal:
        check.step("preflight", lambda: preflight(out, timeout=min(150, check.left())))
    model = check.step("model", lambda: make_model(Path(args.model_src), Path(args.model_dir)))
    if args.dry_run:
        check.summary["launch_args"] = {
            label: launch_args(args.model_dir, RUNS[label].policy, RUNS[label].freekv_config,
                               port=30000, graphs=RUNS[label].graphs, flags=RUNS[label].flags)
            for label in RUNS
        }
        check.summary["result"] = "dry run: stopped before the GPU steps"
        check.save()
        log(check.summary["result"])
        return 0 if all(s["ok"] for s in check.summary["steps"].values()) else 1
    if model is None:
        check.summary["result"] = "no model: nothing launched"
        check.save()
        return 1

    env = dict(os.environ)
    aot = (check.summary["environment"].get("bundle") or {}).get("flashinfer_aot") or {}
    if "prefill_fa3" not in aot and "SGLANG_FLASHINFER_USE_PAGED" not in env:
        # Without a prebuilt FA3 module SGLang's ragged prefill would JIT it for minutes: use
        # the paged FA2 prefill (prebuilt) for every run alike.
        env["SGLANG_FLASHINFER_USE_PAGED"] = "1"
    check.summary["server_env"] = {k: v for k, v in env.items() if k.startswith(("SGLANG_", "FREEKV_", "FLASHINFER_"))}
    port = 31000
    labels = [r for r in args.runs.split(",") if r] + [r for r in args.extra.split(",") if r]
    optional = {r for r in args.extra.split(",") if r}
    for label in labels:
        if label not in RUNS:
            check.summary["runs"][label] = {"skipped": f"unknown run; known: {sorted(RUNS)}"}
            continue
        run = RUNS[label]
        if label in optional and check.left() < run.need_s:
            check.summary["runs"][label] = {"skipped": f"{check.left():.0f} s left < {run.need_s} s"}
            check.save()
            continue
        run_env = dict(env, FREEKV_GPU_CHECK_GRAPHS="1" if run.graphs else "0")
        port += 1
        argv = launch_args(args.model_dir, run.policy, run.freekv_config, port, run.graphs, run.flags)
        check.step(f"run_{label}", lambda: run_server_workload(
            check, label, argv, port, run_env, run.workload))

    verdict = make_verdict(check.summary["runs"])
    check.summary["verdict"] = verdict
    check.summary["result"] = "done"
    check.save()
    log(json.dumps(verdict)[:2000])
    return 0 if all(s["ok"] for s in check.summary["steps"].values()) else 1


@dataclass(frozen=True)
class Run:
    policy: str
    freekv_config: dict[str, Any] | None
    graphs: bool
    workload: dict[str, Any]
    need_s: int = 0  # seconds it needs when optional (skipped with less left)
    flags: tuple[str, ...] = ()  # extra launch flags


def make_runs(sizes: Sizes) -> dict[str, Run]:
    """Every run the check knows; ``--runs`` and ``--extra`` pick among them."""
    ctx = sizes.decode_context
    both = {"equivalence": sizes.equiv_prompts, "decode": ctx}
    triton = ("--attention-backend", "triton")
    return {
        "default": Run("default", None, False, {**both, "equivalence_16k": (ctx,)}),
        "freekv": Run("freekv", sizes.freekv, False, both),
        "freekv_dense16k": Run("freekv", sizes.freekv_dense, False, {"equivalence_16k": (ctx,)}, 150),
        "default_graphs": Run("default", None, True, {"decode": ctx}, 150),
        # SGLang's Triton attention backend under both policies (the FreeKV wrapper wraps it).
        "default_triton": Run("default", None, False, both, 150, triton),
        "freekv_triton": Run("freekv", sizes.freekv, False, both, 150, triton),
    }


RUNS = make_runs(GPU_SIZES)


if __name__ == "__main__":
    sys.exit(main())
