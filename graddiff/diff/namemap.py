"""Name maps: rules from run B's record names to run A's, with layout transforms.

A stage before pairing (``graddiff compare A B --map map.yaml``): each record name of B is
rewritten to the name of A's record that holds the same tensor; mapped.py then writes B's
records under those names (transposed, split or joined where a rule says so) and the differ
pairs them as usual. Pure Python: no h5py, no torch.

A map is a YAML or JSON object ``{"rules": [...]}`` (or a bare list). A rule is either the
string ``"B_PATTERN -> A_PATTERN"`` or an object::

    from: encoder.layer.{i}.attention.self.query   # B's name; {x} captures one dotted part
    to: blocks.{i}.attn.q_proj                     # A's name, with the captures
    # optional:
    regex: false          # true: `from` is a Python regex (full match), `to` uses \\1 or \\g<name>
    kinds: [param, grad]  # only these kinds (default: every kind)
    transpose: true       # swap the last two dims (or a permutation, e.g. [1, 0, 2])
    reshape: [64, 3, 32]  # A's shape, same number of elements
    dim: 0                # split/join dim of parameters, gradients, buffers (default 0)
    output_dim: -1        # split/join dim of activations, output gradients, inputs (default -1)

``to`` as a list splits one B record into several of A (a fused ``qkv`` into ``q``, ``k``,
``v``; sizes from A's shapes, else equal parts); ``from`` as a list joins several B records
into one of A. A glob rule also maps every name under its pattern: ``a.b -> x.y`` maps module
``a.b`` and its parameter ``a.b.weight`` to ``x.y.weight``. The rule matching more dotted parts
of a name wins; two rules matching one name equally are an error, as is a rule matching nothing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import GraddiffError
from ..kinds import ALL_KINDS, Kind

#: Kinds whose tensors are module outputs (or model inputs): their feature dim is the last.
OUTPUT_KINDS = frozenset({Kind.ACTIVATION.value, Kind.GRAD_OUTPUT.value, Kind.INPUT.value})

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_RULE_KEYS = {
    "from",
    "to",
    "regex",
    "kinds",
    "transpose",
    "reshape",
    "dim",
    "output_dim",
    "confidence",  # written by `graddiff map`, ignored when reading
    "evidence",
}


class MapError(GraddiffError):
    """A name map that cannot be read or applied (exit 2, one line naming the rule)."""


@dataclass(frozen=True)
class Rule:
    """One rule of a name map (``index`` is its 1-based position, for messages)."""

    index: int
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    regex: bool = False
    kinds: Optional[frozenset[str]] = None
    transpose: Optional[tuple[int, ...]] = None  # () means "swap the last two dims"
    reshape: Optional[tuple[int, ...]] = None
    dim: int = 0
    output_dim: int = -1
    _compiled: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def text(self) -> str:
        def side(xs: tuple[str, ...]) -> str:
            return xs[0] if len(xs) == 1 else "[" + ", ".join(xs) + "]"

        return f"rule {self.index} ({side(self.sources)} -> {side(self.targets)})"

    @property
    def split(self) -> bool:
        return len(self.targets) > 1

    @property
    def join(self) -> bool:
        return len(self.sources) > 1

    @property
    def transforms(self) -> bool:
        return self.split or self.join or self.transpose is not None or self.reshape is not None

    def dim_for(self, kind: str) -> int:
        return self.output_dim if kind in OUTPUT_KINDS else self.dim


@dataclass(frozen=True)
class Match:
    """Where one B record goes: its rule, A's name(s), and its part (for joins)."""

    rule: Optional[Rule]
    targets: tuple[str, ...]
    part: int = 0  # index among the rule's sources (joins)
    width: int = 0  # dotted parts matched (the rule's specificity)


def _compile_glob(pattern: str) -> tuple[re.Pattern, int]:
    out, pos = [], 0
    for m in _CAPTURE.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]).replace(r"\*", r"[^.]*"))
        out.append(f"(?P<{m.group(1)}>[^.]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]).replace(r"\*", r"[^.]*"))
    return re.compile("".join(out) + r"(?:\.(?P<_rest>.+))?"), pattern.count(".") + 1


def _as_ints(value: Any, what: str, where: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise MapError(f"{where}: '{what}' must be a list of integers, got {value!r}")
    return tuple(value)


def _names(value: Any, key: str, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise MapError(f"{where}: '{key}' must be a name or a list of names, got {value!r}")
    return tuple(v.strip() for v in items)


def parse_rule(index: int, spec: Any) -> Rule:
    """One rule from its map entry (a ``"B -> A"`` string or an object)."""
    where = f"rule {index}"
    if isinstance(spec, str):
        if spec.count("->") != 1:
            raise MapError(f"{where} {spec!r}: write it as 'B_NAME -> A_NAME'")
        src, dst = (s.strip() for s in spec.split("->"))
        spec = {"from": src, "to": dst}
    if not isinstance(spec, dict):
        raise MapError(f"{where}: a rule is 'B -> A' or an object with 'from' and 'to'")
    unknown = set(spec) - _RULE_KEYS
    if unknown:
        raise MapError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    if "from" not in spec or "to" not in spec:
        raise MapError(f"{where}: needs both 'from' (B's name) and 'to' (A's name)")
    sources, targets = _names(spec["from"], "from", where), _names(spec["to"], "to", where)
    if len(sources) > 1 and len(targets) > 1:
        raise MapError(f"{where}: split one name into several or join several into one, not both")
    regex = bool(spec.get("regex", False))
    kinds = spec.get("kinds")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        bad = [k for k in kinds if k not in ALL_KINDS]
        if bad:
            raise MapError(f"{where}: unknown kind(s) {', '.join(map(str, bad))}")
        kinds = frozenset(kinds)
    transpose = spec.get("transpose")
    if transpose is True:
        transpose = ()
    elif transpose in (None, False):
        transpose = None
    else:
        transpose = _as_ints(transpose, "transpose", where)
        if sorted(transpose) != list(range(len(transpose))):
            raise MapError(f"{where}: transpose {list(transpose)} is not a permutation")
    reshape = spec.get("reshape")
    reshape = None if reshape is None else _as_ints(reshape, "reshape", where)
    dims = {}
    for key, default in (("dim", 0), ("output_dim", -1)):
        v = spec.get(key, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise MapError(f"{where}: '{key}' must be an integer")
        dims[key] = v
    if (transpose is not None or reshape is not None) and (len(sources) > 1 or len(targets) > 1):
        raise MapError(f"{where}: transpose/reshape apply to one-to-one rules only")
    if regex:
        try:
            compiled = tuple(re.compile(s) for s in sources)
        except re.error as exc:
            raise MapError(f"{where}: bad regular expression ({exc})") from None
        widths = tuple(0 for _ in sources)
    else:
        pairs = [_compile_glob(s) for s in sources]
        compiled, widths = tuple(p for p, _ in pairs), tuple(w for _, w in pairs)
        captured = [set(_CAPTURE.findall(s)) for s in sources]
        for t in targets:
            missing = set(_CAPTURE.findall(t)) - set.intersection(*captured)
            if missing:
                raise MapError(
                    f"{where}: '{t}' uses {{{', '.join(sorted(missing))}}}, which 'from' does not capture"
                )
    return Rule(
        index,
        sources,
        targets,
        regex,
        kinds,
        transpose,
        reshape,
        dims["dim"],
        dims["output_dim"],
        (compiled, widths),
    )


class NameMap:
    """An ordered list of rules; ``match(kind, name)`` says where a B record goes."""

    def __init__(self, rules: list[Rule], origin: str = "name map") -> None:
        self.rules = rules
        self.origin = origin
        self._cache: dict[tuple[str, str], Match] = {}

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, kind: str, name: str) -> Match:
        """A's name(s) for B's record; an identity ``Match`` (rule None) when no rule matches."""
        key = (kind, name)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._match(kind, name)
        return hit

    def _match(self, kind: str, name: str) -> Match:
        found: list[Match] = []
        for rule in self.rules:
            if rule.kinds is not None and kind not in rule.kinds:
                continue
            patterns, widths = rule._compiled
            for part, (pat, width) in enumerate(zip(patterns, widths)):
                m = pat.fullmatch(name)
                if m is None:
                    continue
                if rule.regex:
                    targets = tuple(m.expand(t) for t in rule.targets)
                    width = name.count(".") + 1
                else:
                    caps = {k: v for k, v in m.groupdict().items() if k != "_rest"}
                    rest = m.group("_rest")
                    targets = tuple(
                        _CAPTURE.sub(lambda c, caps=caps: caps[c.group(1)], t)
                        + (f".{rest}" if rest else "")
                        for t in rule.targets
                    )
                    if rest and rule.transforms and not (rule.split or rule.join):
                        continue  # transpose/reshape: the named tensor only, not those under it
                found.append(Match(rule, targets, part, width))
                break
        if not found:
            return Match(None, (name,))
        found.sort(key=lambda m: -m.width)
        if len(found) > 1 and found[1].width == found[0].width:
            a, b = found[0].rule, found[1].rule
            assert a is not None and b is not None
            raise MapError(
                f"{self.origin}: {a.text} and {b.text} both map {kind} '{name}' "
                f"(overlapping rules; make one more specific or restrict it with 'kinds')"
            )
        return found[0]

    def to_dict(self) -> dict[str, Any]:
        return {"rules": [rule_to_dict(r) for r in self.rules]}


def rule_to_dict(r: Rule) -> dict[str, Any]:
    """The map-file form of a rule (what ``graddiff map`` writes)."""
    out: dict[str, Any] = {
        "from": r.sources[0] if len(r.sources) == 1 else list(r.sources),
        "to": r.targets[0] if len(r.targets) == 1 else list(r.targets),
    }
    if r.regex:
        out["regex"] = True
    if r.kinds is not None:
        out["kinds"] = sorted(r.kinds, key=ALL_KINDS.index)
    if r.transpose is not None:
        out["transpose"] = True if r.transpose == () else list(r.transpose)
    if r.reshape is not None:
        out["reshape"] = list(r.reshape)
    if r.dim != 0:
        out["dim"] = r.dim
    if r.output_dim != -1:
        out["output_dim"] = r.output_dim
    return out


def parse_map(data: Any, origin: str = "name map") -> NameMap:
    """A NameMap from loaded map data: ``{"rules": [...]}``, a list of rules, or ``{B: A}``."""
    if isinstance(data, dict) and "rules" in data:
        extra = set(data) - {"rules", "ambiguous", "unmatched_a", "unmatched_b", "graddiff_map"}
        if extra:
            raise MapError(f"{origin}: unknown top-level key(s) {', '.join(sorted(extra))}")
        items = data["rules"]
    elif isinstance(data, dict):
        items = [{"from": k, "to": v} for k, v in data.items()]
    else:
        items = data
    if not isinstance(items, list):
        raise MapError(f"{origin}: expected a list of rules under 'rules'")
    if not items:
        raise MapError(f"{origin}: the map has no rules")
    try:
        rules = [parse_rule(i + 1, spec) for i, spec in enumerate(items)]
    except MapError as exc:
        raise MapError(f"{origin}: {exc}") from None
    return NameMap(rules, origin)


def load_map(source: Any) -> NameMap:
    """A NameMap from a path (.yaml, .yml or .json), a dict/list, or a NameMap."""
    if isinstance(source, NameMap):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return parse_map(source)
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise MapError(f"{path}: cannot read the name map ({exc.strerror or exc})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MapError(f"{path}: not valid JSON ({exc})") from None
    else:
        data = _yaml_load(text, path)
    return parse_map(data, path)


def _yaml_load(text: str, path: str) -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a declared dependency
        raise MapError(
            f"{path}: reading YAML needs pyyaml (pip install pyyaml), or use JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()
        raise MapError(f"{path}: not valid YAML ({first[0] if first else 'parse error'})") from None


def dump_map(data: dict[str, Any], path: str) -> None:
    """Write a map (``graddiff map -o``): YAML unless the path ends in .json."""
    if path.endswith(".json"):
        text = json.dumps(data, indent=2) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
