#!/usr/bin/env python
"""Regenerate the audited SGLang / vLLM request-model field lists (run by hand, not in CI).

`tests/test_rollout_engine_fields.py` holds, per engine version, the fields each request model
accepts, the routes the adapters may call and a few version markers. This tool reads them from the
engines' own wheels, without installing anything: each wheel is opened as a zip and the source files
are parsed with `ast` (nothing of the engine is imported), so every version can be read on a CPU-only
machine.

    python tools/audit_engine_fields.py --download                 # every audited version, as JSON
    python tools/audit_engine_fields.py --sglang 0.5.21 --vllm 0.28.0 --wheels /tmp/wheels
    python tools/audit_engine_fields.py --sglang 0.5.23 --construct-with /work/vllm-venv/bin/python

`--download` fetches missing wheels with `pip download <engine>==<version> --no-deps --only-binary
:all:` into `--wheels` (vLLM wheels are 250 - 500 MB each). Output: one JSON object
{engine: {version: {"wheel", "routes", "models", "markers"}}}; a model is {"file", "required",
"optional", "types"} (types: the annotation source of every field), or null when the wheel lacks it.

`--construct-with PY` (SGLang only) additionally imports `sglang.srt.managers.io_struct` from the
wheel with interpreter PY (it needs torch, pydantic, msgspec, fastapi, ...: the vLLM venv has them,
the project venv does not) and constructs every request model from the bodies the adapters send
(recorded by the test module's stand-in servers): `Cls(**body)`, `SamplingParams(**sampling_params)`
and, where the wheel has it, the /generate JSON contract `GenerateRequest.from_json_value(body)`.
Modules the import needs but PY lacks are replaced by empty stand-ins, one at a time, and listed.
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from typing import Any, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VERSIONS = {
    "sglang": ["0.5.2", "0.5.3", "0.5.20", "0.5.21", "0.5.22", "0.5.23"],
    "vllm": ["0.10.2", "0.15.0", "0.16.0", "0.17.0", "0.20.2", "0.21.0", "0.27.1", "0.28.0", "0.32.0"],
}

# model -> files (inside the wheel) that may define it; the first file defining the class wins
MODELS = {
    "sglang": {
        "GenerateReqInput": ["sglang/srt/managers/io_struct.py"],
        "SamplingParams": ["sglang/srt/sampling/sampling_params.py"],
        "api.v1.SamplingParams": ["sglang/api/v1/api_types.py"],
        "api.v1.GenerateRequest": ["sglang/api/v1/api_types.py"],
        "UpdateWeightFromDiskReqInput": ["sglang/srt/managers/io_struct.py"],
        "InitWeightsUpdateGroupReqInput": ["sglang/srt/managers/io_struct.py"],
        "UpdateWeightsFromDistributedReqInput": ["sglang/srt/managers/io_struct.py"],
        "DestroyWeightsUpdateGroupReqInput": ["sglang/srt/managers/io_struct.py"],
        "PauseGenerationReqInput": ["sglang/srt/managers/io_struct.py"],
        "ContinueGenerationReqInput": ["sglang/srt/managers/io_struct.py"],
        "BeginWeightUpdateReqInput": ["sglang/srt/managers/io_struct.py"],
        "EndWeightUpdateReqInput": ["sglang/srt/managers/io_struct.py"],
    },
    "vllm": {
        "CompletionRequest": ["vllm/entrypoints/openai/completion/protocol.py", "vllm/entrypoints/openai/protocol.py"],
        # responses: the fields the adapter reads must exist
        "CompletionResponse": ["vllm/entrypoints/openai/completion/protocol.py", "vllm/entrypoints/openai/protocol.py"],
        "CompletionResponseChoice": ["vllm/entrypoints/openai/completion/protocol.py",
                                     "vllm/entrypoints/openai/protocol.py"],
        "CompletionLogProbs": ["vllm/entrypoints/openai/completion/protocol.py", "vllm/entrypoints/openai/protocol.py"],
        "NCCLWeightTransferInitInfo": ["vllm/distributed/weight_transfer/nccl_common.py",
                                       "vllm/distributed/weight_transfer/nccl_engine.py"],
        "NCCLWeightTransferUpdateInfo": ["vllm/distributed/weight_transfer/nccl_engine.py"],
        "NCCLTrainerSendWeightsArgs": ["vllm/distributed/weight_transfer/nccl_engine.py"],
        # a method: its keyword parameters (what collective_rpc("reload_weights", kwargs=...) may pass)
        "GPUModelRunner#reload_weights": ["vllm/v1/worker/gpu_model_runner.py"],
    },
}

ROUTE_FILES = {"sglang": ["sglang/srt/entrypoints/http_server.py"], "vllm": ["vllm/entrypoints/**/*.py"]}

PATHS = {  # the routes the adapters call (or may fall back to)
    "sglang": ["/generate", "/health", "/get_server_info", "/server_info", "/pause_generation",
               "/continue_generation", "/flush_cache", "/update_weights_from_disk", "/init_weights_update_group",
               "/update_weights_from_distributed", "/destroy_weights_update_group", "/begin_weight_update",
               "/end_weight_update"],
    "vllm": ["/v1/completions", "/v1/models", "/version", "/health", "/pause", "/resume", "/collective_rpc",
             "/reset_prefix_cache", "/init_weight_transfer_engine", "/start_weight_update", "/update_weights",
             "/finish_weight_update"],
}

# marker -> (file, text it must contain), or (file, "def NAME" / "class NAME" / "attr CLASS.NAME")
MARKERS = {
    "sglang": {
        "update_session_required": ("sglang/srt/managers/scheduler_components/weight_updater.py",
                                    "must run between"),
        "generate_json_contract": ("sglang/srt/entrypoints/api_contract.py", "def generate_contract_error"),
        "sampling_seed_only_with_deterministic_inference": ("sglang/srt/sampling/sampling_batch_info.py",
                                                            "if enable_deterministic"),
    },
    "vllm": {
        "start_weight_update_required": ("vllm/v1/worker/gpu_worker.py",
                                         "start_weight_update must be called before update_weights"),
        "legacy_trainer_init": ("vllm/distributed/weight_transfer/nccl_engine.py",
                                "attr NCCLWeightTransferEngine.trainer_init"),
        "legacy_trainer_send_weights_args": ("vllm/distributed/weight_transfer/nccl_engine.py",
                                             "class NCCLTrainerSendWeightsArgs"),
        "engine_trainer_class": ("vllm/distributed/weight_transfer/nccl_engine.py",
                                 "class NCCLTrainerWeightTransferEngine"),
        "nccl_common_trainer_init": ("vllm/distributed/weight_transfer/nccl_common.py", "def trainer_init"),
        "reload_weights_takes_weights_path": ("vllm/v1/worker/gpu_model_runner.py", "weights_path: str"),
    },
}


# fields whose annotation goes into the *_TYPES literals: the ones the adapters send
TYPED_FIELDS = {
    "sglang": {"input_ids", "sampling_params", "return_logprob", "max_new_tokens", "temperature", "top_p", "top_k",
               "skip_special_tokens", "stop_token_ids", "sampling_seed", "model_path", "weight_version",
               "master_address", "master_port", "rank_offset", "world_size", "group_name", "backend", "names",
               "dtypes", "shapes", "flush_cache"},
    "vllm": {"model", "prompt", "n", "max_tokens", "temperature", "top_p", "top_k", "logprobs",
             "return_tokens_as_token_ids", "return_token_ids", "skip_special_tokens", "stop_token_ids", "seed",
             "master_address", "master_port", "rank_offset", "world_size", "packed", "names", "dtype_names",
             "shapes", "weights_path", "choices", "index", "token_ids", "finish_reason", "tokens",
             "token_logprobs"},
}


# ------------------------------------------------------------------------------------------- wheels
def find_wheel(engine: str, version: str, wheels: str, download: bool) -> str:
    """The wheel file of engine==version in `wheels` (downloaded there first with `download`)."""
    pattern = os.path.join(wheels, f"{engine}-{version}-*.whl")
    found = sorted(glob.glob(pattern))
    if not found and download:
        os.makedirs(wheels, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"{engine}=={version}", "--no-deps",
                        "--only-binary", ":all:", "-d", wheels, "-q"], check=True)
        found = sorted(glob.glob(pattern))
    if not found:
        raise SystemExit(f"no wheel {pattern}; pass --download or put it there")
    return found[0]


class Wheel:
    def __init__(self, path: str) -> None:
        self.path = path
        self.zip = zipfile.ZipFile(path)
        self.names = set(self.zip.namelist())
        self._ast: dict[str, Optional[ast.Module]] = {}

    def files(self, pattern: str) -> list[str]:
        if "*" not in pattern:
            return [pattern] if pattern in self.names else []
        import fnmatch

        return sorted(n for n in self.names if fnmatch.fnmatch(n, pattern))

    def text(self, name: str) -> Optional[str]:
        return self.zip.read(name).decode() if name in self.names else None

    def tree(self, name: str) -> Optional[ast.Module]:
        if name not in self._ast:
            src = self.text(name)
            self._ast[name] = None if src is None else ast.parse(src)
        return self._ast[name]


# ---------------------------------------------------------------------------------------- ast reading
def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _has_default(value: Optional[ast.expr]) -> bool:
    """A class-level `name: T = value` has a default unless value is missing or a field()/Field() without one."""
    if value is None:
        return False
    if isinstance(value, ast.Call):
        fn = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", "")
        if fn in ("field", "Field"):
            kws = {k.arg for k in value.keywords}
            if kws & {"default", "default_factory"}:
                return True
            if fn == "Field" and value.args:
                first = value.args[0]
                return not (isinstance(first, ast.Constant) and first.value is Ellipsis)
            return False
    return True


def class_fields(tree: ast.Module, name: str, others: list[ast.Module]) -> dict[str, tuple[bool, str]]:
    """{field: (required, annotation)} of class `name`, bases (found in `tree` or `others`) first.

    Class-level annotated names are the fields (dataclass, msgspec.Struct, pydantic); ClassVar ones
    are skipped. A class without any (a plain class) is read from its __init__ parameters."""
    cls = _classes(tree).get(name)
    if cls is None:
        return {}
    out: dict[str, tuple[bool, str]] = {}
    for base in cls.bases:
        bname = base.id if isinstance(base, ast.Name) else None
        for t in [tree] + others:
            if bname and bname in _classes(t):
                out.update(class_fields(t, bname, others))
                break
    own = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            ann = ast.unparse(stmt.annotation)
            if ann.startswith(("ClassVar", "typing.ClassVar")) or ann in ("KW_ONLY", "dataclasses.KW_ONLY"):
                continue
            own[stmt.target.id] = (not _has_default(stmt.value), ann)
    if not own and not out:
        init = next((s for s in cls.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        if init is not None:
            args = init.args.args[1:]
            n_req = len(args) - len(init.args.defaults)
            for i, a in enumerate(args):
                own[a.arg] = (i < n_req, ast.unparse(a.annotation) if a.annotation else "Any")
            for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults):
                own[a.arg] = (d is None, ast.unparse(a.annotation) if a.annotation else "Any")
    out.update(own)
    return out


def method_params(tree: ast.Module, cls_name: str, method: str) -> Optional[dict[str, tuple[bool, str]]]:
    """{param: (required, annotation)} of cls_name.method (self excluded), None when absent."""
    cls = _classes(tree).get(cls_name)
    fn = next((s for s in (cls.body if cls else []) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
               and s.name == method), None)
    if fn is None:
        return None
    args = fn.args.args[1:]
    n_req = len(args) - len(fn.args.defaults)
    out = {a.arg: (i < n_req, ast.unparse(a.annotation) if a.annotation else "Any") for i, a in enumerate(args)}
    for a, d in zip(fn.args.kwonlyargs, fn.args.kw_defaults):
        out[a.arg] = (d is None, ast.unparse(a.annotation) if a.annotation else "Any")
    return out


def _body_model(fn: ast.AsyncFunctionDef | ast.FunctionDef) -> Any:
    """How a FastAPI handler reads its body: the model class name (`obj: Cls`, `Annotated[Cls, Body()]`),
    {"embed": {key: annotation}} for `Annotated[T, Body(embed=True)]` parameters, or None (no model:
    the handler reads the raw JSON itself, or takes no body)."""
    embed: dict[str, str] = {}
    for a in fn.args.args:
        ann = a.annotation
        if ann is None:
            continue
        if isinstance(ann, ast.Subscript) and ast.unparse(ann.value) == "Annotated":
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            body = [e for e in elts[1:] if "Body" in ast.unparse(e)]
            if body and "embed=True" in ast.unparse(body[0]):
                embed[a.arg] = ast.unparse(elts[0])
            elif body:
                return ast.unparse(elts[0])
        elif isinstance(ann, ast.Name) and ann.id.endswith(("ReqInput", "Req", "Request")) and ann.id != "Request":
            return ann.id
    return {"embed": embed} if embed else None


def routes(wheel: Wheel, patterns: list[str], wanted: list[str]) -> dict[str, dict[str, Any]]:
    """{path: {"methods": [...], "body": model or None, "file": ...}} for the `wanted` paths."""
    out: dict[str, dict[str, Any]] = {}
    for pattern in patterns:
        for name in wheel.files(pattern):
            tree = wheel.tree(name)
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for dec in fn.decorator_list:
                    if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.args):
                        continue
                    kind = dec.func.attr
                    path = dec.args[0].value if isinstance(dec.args[0], ast.Constant) else None
                    if kind not in ("get", "post", "put", "api_route") or path not in wanted:
                        continue
                    methods = [kind.upper()]
                    if kind == "api_route":
                        kw = {k.arg: k.value for k in dec.keywords}
                        methods = [e.value for e in kw["methods"].elts] if "methods" in kw else ["GET"]
                    entry = out.setdefault(path, {"methods": [], "body": None, "file": name})
                    entry["methods"] = sorted(set(entry["methods"]) | set(methods))
                    entry["body"] = entry["body"] or _body_model(fn)
    return dict(sorted(out.items()))


def marker(wheel: Wheel, file: str, needle: str) -> bool:
    src = wheel.text(file)
    if src is None:
        return False
    kind, _, rest = needle.partition(" ")
    if kind in ("def", "class"):
        types = (ast.FunctionDef, ast.AsyncFunctionDef) if kind == "def" else (ast.ClassDef,)
        return any(isinstance(n, types) and n.name == rest for n in wheel.tree(file).body)
    if kind == "attr":
        cls_name, attr = rest.split(".")
        cls = _classes(wheel.tree(file)).get(cls_name)
        if cls is None:
            return False
        for s in cls.body:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.name == attr:
                return True
            if isinstance(s, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in s.targets):
                return True
        return False
    return needle in src


def audit(engine: str, wheel_path: str) -> dict[str, Any]:
    wheel = Wheel(wheel_path)
    models: dict[str, Any] = {}
    for model, files in MODELS[engine].items():
        cls_name, _, method = model.rsplit(".", 1)[-1].partition("#")
        models[model] = None
        trees = [wheel.tree(f) for f in files if wheel.tree(f) is not None]
        for f in files:
            tree = wheel.tree(f)
            if tree is None or cls_name not in _classes(tree):
                continue
            others = [t for t in trees if t is not tree]
            others += [wheel.tree(b) for b in wheel.files(os.path.dirname(f) + "/*.py") if wheel.tree(b) is not tree]
            fields = method_params(tree, cls_name, method) if method else class_fields(tree, cls_name, others)
            if fields is None:
                continue
            models[model] = {"file": f, "required": [k for k, (r, _) in fields.items() if r],
                             "optional": [k for k, (r, _) in fields.items() if not r],
                             "types": {k: a for k, (_, a) in fields.items()}}
            break
    return {"wheel": os.path.basename(wheel_path),
            "routes": routes(wheel, ROUTE_FILES[engine], PATHS[engine]),
            "models": models,
            "markers": {k: marker(wheel, f, n) for k, (f, n) in MARKERS[engine].items()}}


# ------------------------------------------------------------------------------- construct (SGLang)
CONSTRUCT = r'''
import json, sys, types, importlib.abc, importlib.machinery, traceback
src, bodies = sys.argv[1], json.load(sys.stdin)
sys.path.insert(0, src)
try:
    import transformers.models.auto.image_processing_auto  # noqa: F401 - before any stand-in exists
except Exception:
    pass
stubbed = []
class AnyMeta(type):  # a stand-in class: every attribute, call, subscript or union is another stand-in
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls
    def __call__(cls, *a, **k):
        return a[0] if len(a) == 1 and callable(a[0]) and not k else cls
    __getitem__ = __or__ = __ror__ = lambda cls, *a: cls
    def __iter__(cls):
        return iter(())
class AnyModule(types.ModuleType):
    __path__ = []
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return AnyMeta(name, (), {})
class Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self, is_package=True) if name.split(".")[0] in stubbed else None
    def create_module(self, spec):
        return AnyModule(spec.name)
    def exec_module(self, m):
        pass
sys.meta_path.append(Stub())
for _ in range(20):
    try:
        import sglang.srt.managers.io_struct as io
        import sglang.srt.sampling.sampling_params as sp
        break
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or top in stubbed or top == "sglang":
            raise
        stubbed.append(top)
        for k in [k for k in sys.modules if k.split(".")[0] in ("sglang", top)]:
            del sys.modules[k]
try:
    from sglang.api.v1.api_types import GenerateRequest
except ImportError:
    GenerateRequest = None
report = {"stubbed": stubbed, "results": []}
for path, model, body in bodies:
    checks = [(model, lambda: getattr(io, model)(**body))]
    if path == "/generate":
        checks.append(("SamplingParams", lambda: sp.SamplingParams(**body["sampling_params"])))
        if GenerateRequest is not None:
            checks.append(("api.v1.GenerateRequest", lambda: GenerateRequest.from_json_value(body)))
    for name, fn in checks:
        try:
            fn(); err = None
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
        report["results"].append([path, name, err])
print(json.dumps(report))
'''


def construct(py: str, wheel_path: str, version: str) -> dict[str, Any]:
    """Build SGLang's request models from the adapter's recorded bodies with interpreter `py`."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    from test_rollout_engine_fields import record_sglang  # noqa: E402 - the tests' recording stand-in

    audited = audit("sglang", wheel_path)
    bodies = []
    for method, path, body in record_sglang(version):
        model = (audited["routes"].get(path) or {}).get("body")
        if method == "POST" and model and isinstance(body, dict):
            bodies.append([path, model, body])
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel_path) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith("sglang/")])
        out = subprocess.run([py, "-c", CONSTRUCT, tmp], input=json.dumps(bodies), capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    if out.returncode != 0:
        return {"import_error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _ranges(per_version: dict[str, Any], key) -> list[tuple[str, str, Any]]:
    """[(first, last, value)]: consecutive audited versions with the same key(entry) merged."""
    out: list[list[Any]] = []
    for v, entry in per_version.items():
        value = key(entry)
        if out and out[-1][2] == value:
            out[-1][1] = v
        else:
            out.append([v, v, value])
    return [tuple(r) for r in out]


def _words(names: list[str], indent: int) -> str:
    """A space-separated string literal, wrapped into implicitly concatenated pieces."""
    import textwrap

    lines = textwrap.wrap(" ".join(names), 100 - indent) or [""]
    pad = " " * indent
    return ("\n" + pad).join(repr(ln + (" " if i < len(lines) - 1 else "")) for i, ln in enumerate(lines))


def as_python(engine: str, per_version: dict[str, Any]) -> str:
    """The literals of tests/engine_fields_audit.py for `engine`, consecutive equal versions merged."""
    up = engine.upper()
    lines = [f"{up}_WHEELS = {{"] + [f"    {v!r}: {e['wheel']!r}," for v, e in per_version.items()] + ["}"]
    lines.append(f"{up}_ROUTES = {{  # path -> {{(first, last): methods}}")
    for path in PATHS[engine]:
        rs = _ranges(per_version, lambda e: " ".join((e["routes"].get(path) or {}).get("methods", [])))
        lines.append(f"    {path!r}: {{" + ", ".join(f"({a!r}, {b!r}): {m!r}" for a, b, m in rs if m) + "},")
    lines.append("}")
    lines.append(f"{up}_MARKERS = {{  # marker -> {{(first, last): value}}; (file, text) in MARKERS of the tool")
    for name in MARKERS[engine]:
        rs = _ranges(per_version, lambda e: e["markers"][name])
        lines.append(f"    {name!r}: {{" + ", ".join(f"({a!r}, {b!r}): {m!r}" for a, b, m in rs) + "},")
    lines.append("}")
    lines.append(f"{up}_MODELS = {{  # model -> {{(first, last): (required, optional)}}, space-separated names")
    types = [f"{up}_TYPES = {{  # model -> {{(first, last): {{field: annotation}}}} for the fields the adapters send"]
    for model in MODELS[engine]:
        def fields(e, model=model):
            m = e["models"][model]
            return None if m is None else (tuple(m["required"]), tuple(m["optional"]))

        def typed(e, model=model):
            m = e["models"][model]
            return None if m is None else tuple((k, a) for k, a in m["types"].items()
                                                if k in TYPED_FIELDS[engine] or k in m["required"])

        files = sorted({e["models"][model]["file"] for e in per_version.values() if e["models"][model]})
        lines.append(f"    {model!r}: {{  # {', '.join(files)}")
        types.append(f"    {model!r}: {{")
        for a, b, val in _ranges(per_version, fields):
            if val is not None:
                lines.append(f"        ({a!r}, {b!r}): ({_words(list(val[0]), 9)},")
                lines.append(f"                         {_words(list(val[1]), 25)}),")
        for a, b, val in _ranges(per_version, typed):
            if val:
                types.append(f"        ({a!r}, {b!r}): {{")
                types += [f"            {k!r}: {t!r}," for k, t in val]
                types.append("        },")
        lines.append("    },")
        types.append("    },")
    return "\n".join(lines + ["}"] + types + ["}"])


PY_HEADER = '''"""Audited request-model field lists of SGLang and vLLM, per version range. GENERATED: do not edit.

Regenerate with `python tools/audit_engine_fields.py --download --python > tests/engine_fields_audit.py`.
Each list is read (ast, nothing imported) from the engine's wheel named in *_WHEELS for the versions a
range spans: a range (first, last) means every audited version from first to last has exactly these
fields (unaudited versions in between are assumed to match). Files: SGLang sglang/srt/managers/io_struct.py,
sglang/srt/sampling/sampling_params.py, sglang/api/v1/api_types.py (>= 0.5.22),
sglang/srt/entrypoints/http_server.py (routes); vLLM vllm/entrypoints/openai/[completion/]protocol.py,
vllm/distributed/weight_transfer/nccl_engine.py and nccl_common.py, vllm/entrypoints/**.py (routes).
The file of each model is named next to it. Used by tests/test_rollout_engine_fields.py.
"""
# ruff: noqa: E501
'''


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", default=os.path.join(tempfile.gettempdir(), "fipo-engine-wheels"))
    ap.add_argument("--download", action="store_true", help="pip download missing wheels (--no-deps)")
    ap.add_argument("--sglang", default=",".join(VERSIONS["sglang"]), help="comma-separated versions ('' = none)")
    ap.add_argument("--vllm", default=",".join(VERSIONS["vllm"]), help="comma-separated versions ('' = none)")
    ap.add_argument("--construct-with", metavar="PY", help="also construct SGLang's models with interpreter PY")
    ap.add_argument("--python", action="store_true", help="print the test module's literals instead of JSON")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {}
    for engine in ("sglang", "vllm"):
        for version in [v for v in getattr(args, engine).split(",") if v]:
            wheel = find_wheel(engine, version, args.wheels, args.download)
            entry = audit(engine, wheel)
            if engine == "sglang" and args.construct_with:
                entry["construct"] = construct(args.construct_with, wheel, version)
            result.setdefault(engine, {})[version] = entry
    if args.python:
        print(PY_HEADER + "\n\n".join(as_python(e, pv) for e, pv in result.items()))
    else:
        json.dump(result, sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
