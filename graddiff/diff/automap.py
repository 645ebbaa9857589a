"""Propose a name map from the structure of two runs (``--map auto``, ``graddiff map A B``).

Evidence, all from each run's first step: the order of module outputs in the forward pass and
their shapes (aligned by dynamic programming, allowing one fused module of one run to stand for
several consecutive ones of the other), the parameters and buffers under each matched module
(shape, transposed shape, or a fused slice; confirmed by equal values or norms when the weights
were copied), and for the rest, shapes and the order of gradients in the backward pass. Every
pair has a confidence; pairs that another equally good alignment would change are ambiguous
and reported, never silently chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import GraddiffError
from ..format import FLAG_VALUES
from ..modclass import class_of, describe, describe_label
from ..reader import Run
from .generalize import generalize
from .namemap import NameMap, parse_rule

_MODULE_KINDS = ["activation", "grad_output"]
_PARAM_KINDS = ["param", "grad", "autograd_grad"]
_GROUP_KIND = {"module": "activation", "param": "param", "buffer": "buffer"}
_CLOSE = 1e-3  # norms this close (relative) count as the same tensor at the first step
MAX_SPLIT = 4  # a fused module stands for at most this many consecutive ones


@dataclass
class Item:
    name: str
    shape: tuple[int, ...]
    norm: float
    row: Any = None
    cls: str = ""  # the module's class, where the trace recorded it


@dataclass
class Pair:
    """One proposed correspondence: B's name(s) onto A's name(s)."""

    group: str  # "module", "param" or "buffer"
    b: tuple[str, ...]
    a: tuple[str, ...]
    confidence: float
    evidence: str
    transpose: bool = False
    ambiguous: bool = False

    def rule(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "from": self.b[0] if len(self.b) == 1 else list(self.b),
            "to": self.a[0] if len(self.a) == 1 else list(self.a),
            "kinds": list(
                {"module": _MODULE_KINDS, "param": _PARAM_KINDS, "buffer": ["buffer"]}[self.group]
            ),
        }
        if self.transpose:
            out["transpose"] = True
        out["confidence"] = round(self.confidence, 2)
        out["evidence"] = self.evidence
        return out


@dataclass
class Proposal:
    """A proposed map, its ambiguous pairs and what stayed unmatched on either side."""

    pairs: list[Pair]
    unmatched_a: list[str] = field(default_factory=list)
    unmatched_b: list[str] = field(default_factory=list)
    keys_b: list[tuple[str, str]] = field(default_factory=list)  # B's (kind, name)s
    #: module name -> class name of each run (graddiff.modclass; old traces: empty)
    classes_a: dict[str, str] = field(default_factory=dict)
    classes_b: dict[str, str] = field(default_factory=dict)

    @property
    def ambiguous(self) -> list[Pair]:
        return [p for p in self.pairs if p.ambiguous]

    def rules(self) -> list[dict[str, Any]]:
        """The map's rules, per-layer rules folded into ``{i}`` patterns where equivalent; the
        evidence names the module classes paired (``Conv1D -> Linear: forward order, ...``)."""
        concrete = []
        for p in self.pairs:
            if p.a != p.b or p.transpose:
                rule = p.rule()
                cb, ca = self._classes(p, "b"), self._classes(p, "a")
                if ca or cb:
                    rule["evidence"] = f"{cb or '?'} -> {ca or '?'}: {rule['evidence']}"
                concrete.append(rule)
        return generalize(concrete, self.keys_b)

    def _classes(self, p: Pair, side: str) -> str:
        """The class(es) of the modules owning one side's names: ``Linear``, ``Linear + ReLU``."""
        classes, names = (self.classes_a, p.a) if side == "a" else (self.classes_b, p.b)
        kind = _GROUP_KIND[p.group]
        found = [class_of(classes, kind, n) for n in names]
        return " + ".join(dict.fromkeys(c for c in found if c))

    def described(self, p: Pair) -> str:
        """``B's names -> A's names``, each with its module class."""
        kind = _GROUP_KIND[p.group]
        b = ", ".join(describe(self.classes_b, kind, n) for n in p.b)
        a = ", ".join(describe(self.classes_a, kind, n) for n in p.a)
        return f"{b} -> {a}"

    def unmatched(self, side: str) -> list[str]:
        """One run's unmatched records, ``kind name (Class)``."""
        classes, names = (
            (self.classes_a, self.unmatched_a)
            if side == "a"
            else (self.classes_b, self.unmatched_b)
        )
        return [describe_label(classes, n) for n in names]

    @property
    def name_map(self) -> NameMap:
        rules = self.rules()
        if not rules:
            raise GraddiffError("--map auto: the two runs already share their record names")
        return NameMap([parse_rule(i + 1, r) for i, r in enumerate(rules)], "--map auto")

    def to_dict(self) -> dict[str, Any]:
        return {
            "graddiff_map": 1,
            "rules": self.rules(),
            "ambiguous": [f"{p.group} {self.described(p)}" for p in self.ambiguous],
            "unmatched_a": self.unmatched("a"),
            "unmatched_b": self.unmatched("b"),
        }

    def notes(self) -> list[str]:
        out = [
            f"--map auto: {len(self.pairs)} pair(s) proposed from module order, shapes and values "
            f"of the first step (review with `graddiff map A B -o map.yaml`)"
        ]
        if self.ambiguous:
            shown = "; ".join(self.described(p) for p in self.ambiguous[:4])
            out.append(
                f"--map auto: {len(self.ambiguous)} ambiguous pair(s), kept but unsure: {shown}"
                + (" ..." if len(self.ambiguous) > 4 else "")
            )
        return out


def _first_step(run: Run) -> dict[str, list[Item]]:
    """Items of the first step by kind: activations (first calls) in forward order, etc."""
    s = int(run.steps[0])
    rows = run.entries(s, s)
    rows = rows[np.argsort(rows["seq"], kind="stable")]
    out: dict[str, list[Item]] = {}
    classes = getattr(run, "module_classes", {}) or {}
    for row in rows:
        key = run.record_key(int(row["record"]))
        if key.call:
            continue
        shape = tuple(int(x) for x in row["shape"][: int(row["ndim"])])
        cls = str(classes.get(key.name.split(":")[0], "")) if key.kind == "activation" else ""
        out.setdefault(key.kind, []).append(Item(key.name, shape, float(row["norm"]), row, cls))
    return out


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= _CLOSE * max(abs(x), abs(y), 1e-12)


def _joined(items: list[Item], dim: int) -> Optional[tuple[tuple[int, ...], float]]:
    """Shape and norm of these items concatenated along ``dim``; None when they cannot be."""
    base = items[0].shape
    if not base or any(len(it.shape) != len(base) for it in items):
        return None
    d = dim % len(base)
    if any(it.shape[:d] + it.shape[d + 1 :] != base[:d] + base[d + 1 :] for it in items):
        return None
    shape = base[:d] + (sum(it.shape[d] for it in items),) + base[d + 1 :]
    return shape, float(np.sqrt(sum(it.norm**2 for it in items)))


def _window_scores(a: list[Item], b: list[Item], ka: int, kb: int) -> np.ndarray:
    """Score of matching a[i:i+ka] with b[j:j+kb] for every start (i, j).

    0: shapes differ; else 1 for the shape, +2 for close norms, +1 for the same module class.
    """
    ids: dict[Any, int] = {}

    def side(items: list[Item], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sid = np.full(max(len(items) - k + 1, 0), -1, np.int64)
        cid = np.full(len(sid), -2, np.int64)
        norm = np.zeros(len(sid))
        for i in range(len(sid)):
            got = _joined(items[i : i + k], -1) if k > 1 else (items[i].shape, items[i].norm)
            if got is not None:
                sid[i] = ids.setdefault(got[0], len(ids))
                norm[i] = got[1]
            classes = {it.cls for it in items[i : i + k]}
            if len(classes) == 1 and "" not in classes:
                cid[i] = ids.setdefault(("class", classes.pop()), len(ids))
        return sid, cid, norm

    sa, ca, na = side(a, ka)
    sb, cb, nb = side(b, kb)
    same = (sa[:, None] == sb[None, :]) & (sa[:, None] >= 0)
    big = np.maximum(np.maximum(np.abs(na)[:, None], np.abs(nb)[None, :]), 1e-12)
    close = np.abs(na[:, None] - nb[None, :]) <= _CLOSE * big
    same_cls = (ca[:, None] == cb[None, :]) & (ca[:, None] >= 0)
    return np.where(same, 1 + 2 * close + same_cls, 0).astype(np.int64)


def _align(a: list[Item], b: list[Item]):
    """Best alignment of two forward orders: 1:1, 1(B):k(A) and k(B):1(A) matches, and gaps.

    Scores from _window_scores (shape, norm, class); gaps cost nothing.
    Dynamic programming, vectorised per row (a gap in B is a running maximum). Returns the
    matches (i, ka, j, kb, score) and, per match, whether another optimal alignment pairs one
    of its items otherwise (then it is ambiguous).
    """
    n, m = len(a), len(b)
    moves = [(1, 1)] + [(k, 1) for k in range(2, MAX_SPLIT + 1)]
    moves += [(1, k) for k in range(2, MAX_SPLIT + 1)]
    moves = [(ka, kb) for ka, kb in moves if ka <= n and kb <= m]
    score = {mv: _window_scores(a, b, *mv) for mv in moves}
    neg = np.iinfo(np.int64).min // 4
    f = np.zeros((n + 1, m + 1), np.int64)  # best score of a[:i], b[:j]
    for i in range(1, n + 1):
        cand = f[i - 1].copy()
        for (ka, kb), sc in score.items():
            if i >= ka:
                row = sc[i - ka]
                vals = np.where(row > 0, f[i - ka, : m + 1 - kb] + row, neg)
                np.maximum(cand[kb:], vals, out=cand[kb:])
        f[i] = np.maximum.accumulate(cand)
    g = np.zeros((n + 1, m + 1), np.int64)  # best score of a[i:], b[j:]
    for i in range(n - 1, -1, -1):
        cand = g[i + 1].copy()
        for (ka, kb), sc in score.items():
            if i + ka <= n:
                row = sc[i]
                vals = np.where(row > 0, g[i + ka, kb:] + row, neg)
                np.maximum(cand[: m + 1 - kb], vals, out=cand[: m + 1 - kb])
        g[i] = np.maximum.accumulate(cand[::-1])[::-1]
    opt = int(f[n, m])
    matches = []
    i, j = n, m
    while i > 0 and j > 0:
        if f[i, j] == f[i - 1, j]:
            i -= 1
            continue
        if f[i, j] == f[i, j - 1]:
            j -= 1
            continue
        for (ka, kb), sc in score.items():
            if i >= ka and j >= kb:
                v = int(sc[i - ka, j - kb])
                if v and f[i, j] == f[i - ka, j - kb] + v:
                    matches.append((i - ka, ka, j - kb, kb, v))
                    i, j = i - ka, j - kb
                    break
        else:  # pragma: no cover - f is built from exactly these moves
            break
    matches.reverse()
    # how many optimal matches each item can take part in
    count_a, count_b = np.zeros(n, np.int64), np.zeros(m, np.int64)
    for (ka, kb), sc in score.items():
        on = (sc > 0) & (f[: n + 1 - ka, : m + 1 - kb] + sc + g[ka:, kb:] == opt)
        per_i, per_j = on.sum(axis=1), on.sum(axis=0)
        for x in range(ka):
            count_a[x : x + len(per_i)] += per_i
        for y in range(kb):
            count_b[y : y + len(per_j)] += per_j
    unsure = [
        bool((count_a[i : i + ka] > 1).any() or (count_b[j : j + kb] > 1).any())
        for i, ka, j, kb, _ in matches
    ]
    return matches, unsure


def _values(run: Run, it: Item) -> Optional[np.ndarray]:
    if it.row is None or not int(it.row["flags"]) & FLAG_VALUES:
        return None
    return run.values_of(it.row)


class _Tensors:
    """Matching of parameters (or buffers) of two runs, module by module, then the rest."""

    def __init__(self, a: Run, b: Run, items_a: list[Item], items_b: list[Item], group: str):
        self.a, self.b, self.group = a, b, group
        self.items_a = {it.name: it for it in items_a}
        self.items_b = {it.name: it for it in items_b}
        self.order_a = {it.name: i for i, it in enumerate(items_a)}
        self.order_b = {it.name: i for i, it in enumerate(items_b)}
        self.left_a = dict.fromkeys(self.items_a)
        self.left_b = dict.fromkeys(self.items_b)
        self.pairs: list[Pair] = []

    def children(self, side: str, module: str) -> list[str]:
        left = self.left_a if side == "a" else self.left_b
        pre = module + "." if module and module != "(root)" else ""
        return [n for n in left if n.startswith(pre) and "." not in n[len(pre) :]]

    def _evidence(self, bi: Item, ais: list[Item], transpose: bool) -> tuple[float, str]:
        """How sure: equal values 1.0, equal norms 0.8, shapes only 0.5."""
        vb = _values(self.b, bi)
        vas = [_values(self.a, x) for x in ais]
        if vb is not None and all(v is not None for v in vas):
            va = np.concatenate(vas, axis=0) if len(vas) > 1 else vas[0]
            vb2 = vb.T if transpose else vb
            if va.shape == vb2.shape and np.array_equal(va, vb2):
                return 1.0, "equal values at the first step"
            if va.shape == vb2.shape and np.allclose(va, vb2, rtol=1e-5, atol=1e-7):
                return 0.95, "values within rounding at the first step"
            return 0.4, "same shape, different values at the first step"
        norm_a = float(np.sqrt(sum(x.norm**2 for x in ais)))
        if _close(norm_a, bi.norm):
            return 0.8, "equal norms at the first step"
        return 0.5, "same shape"

    def candidates(self, bname: str, anames: list[str]) -> list[tuple[float, str, bool]]:
        bi = self.items_b[bname]
        out = []
        for an in anames:
            ai = self.items_a[an]
            for transpose in (False, True):
                shape = bi.shape[::-1] if transpose else bi.shape
                if transpose and (len(bi.shape) != 2 or bi.shape[0] == bi.shape[1] and False):
                    continue
                if shape != ai.shape:
                    continue
                conf, why = self._evidence(bi, [ai], transpose)
                if transpose:
                    why += " (transposed)"
                # weak cues: the same leaf name, the same position (order of first use)
                cue = 0.02 * (an.rsplit(".", 1)[-1] == bname.rsplit(".", 1)[-1]) + 0.01 * (
                    not transpose
                )
                out.append((conf + cue, an, transpose, why))
        out.sort(key=lambda c: (-c[0], abs(self.order_a[c[1]] - self.order_b[bname])))
        return out

    def match_one(self, bname: str, anames: list[str]) -> None:
        cands = self.candidates(bname, anames)
        if not cands:
            return
        conf, an, transpose, why = cands[0]
        unsure = len(cands) > 1 and cands[1][0] >= conf - 0.05 and cands[0][0] < 1.0
        self.take((bname,), (an,), min(conf, 1.0), why, transpose, unsure)

    def take(self, b, a, conf, why, transpose=False, unsure=False) -> None:
        for n in b:
            self.left_b.pop(n, None)
        for n in a:
            self.left_a.pop(n, None)
        if unsure:
            conf *= 0.5
        self.pairs.append(Pair(self.group, tuple(b), tuple(a), conf, why, transpose, unsure))

    def modules(self, bmod: str, amods: list[str]) -> None:
        """Tensors directly under matched modules (one A module, or several for a fused B one)."""
        kids_b = self.children("b", bmod)
        if len(amods) == 1:
            kids_a = self.children("a", amods[0])
            for bn in kids_b:
                self.match_one(bn, [x for x in kids_a if x in self.left_a])
            return
        per = [self.children("a", m) for m in amods]
        for bn in kids_b:
            leaf = bn.rsplit(".", 1)[-1]
            bi = self.items_b[bn]
            for pick in (leaf, None):  # same leaf name first, then position
                if pick is None:
                    pos = kids_b.index(bn)
                    parts = [k[pos] if pos < len(k) else None for k in per]
                else:
                    parts = [
                        next((x for x in k if x.rsplit(".", 1)[-1] == pick), None) for k in per
                    ]
                if any(p is None for p in parts):
                    continue
                js = _joined([self.items_a[p] for p in parts], 0)  # type: ignore[index]
                if js is None or js[0] != bi.shape:
                    continue
                conf, why = self._evidence(bi, [self.items_a[p] for p in parts], False)  # type: ignore[index]
                self.take((bn,), tuple(parts), conf, why + f" (fused: {len(parts)} parts, dim 0)")
                break

    def rest(self) -> None:
        """Tensors outside matched modules: by shape, values, then gradient order."""
        for bn in list(self.left_b):
            self.match_one(bn, list(self.left_a))


def propose_map(a: Run, b: Run) -> Proposal:
    """A proposed map from B's names to A's, with a confidence per pair."""
    fa, fb = _first_step(a), _first_step(b)
    acts_a, acts_b = fa.get("activation", []), fb.get("activation", [])
    pairs: list[Pair] = []
    module_pairs: list[tuple[str, list[str]]] = []
    matched_a: set[str] = set()
    matched_b: set[str] = set()
    if acts_a and acts_b:
        matches, unsure = _align(acts_a, acts_b)
        for (i, ka, j, kb, sc), u in zip(matches, unsure):
            an = tuple(x.name for x in acts_a[i : i + ka])
            bn = tuple(x.name for x in acts_b[j : j + kb])
            conf = {1: 0.6, 2: 0.7, 3: 0.9, 4: 0.95}[sc] * (0.5 if u else 1.0)
            seen = ["shape"] + ["norm"] * (sc >= 3) + ["class"] * (sc in (2, 4))
            why = "forward order, " + (", ".join(seen[:-1]) + " and " if len(seen) > 1 else "")
            why += seen[-1]
            if ka > 1:
                why += f" (fused: {ka} modules of A)"
            if kb > 1:
                why += f" (fused: {kb} modules of B)"
            pairs.append(Pair("module", bn, an, conf, why, ambiguous=u))
            matched_a.update(an)
            matched_b.update(bn)
            if kb == 1:
                module_pairs.append((bn[0].split(":")[0], [x.split(":")[0] for x in an]))
    # parameters: order of gradients in the backward pass, else of parameters at the start
    grads_a = fa.get("grad") or fa.get("autograd_grad") or []
    grads_b = fb.get("grad") or fb.get("autograd_grad") or []
    tensor_pairs = []
    for kind, group in (("param", "param"), ("buffer", "buffer")):
        ia, ib = fa.get(kind, []), fb.get(kind, [])
        if kind == "param":
            ia = _reorder(ia, grads_a)
            ib = _reorder(ib, grads_b)
        t = _Tensors(a, b, ia, ib, group)
        for bmod, amods in module_pairs:
            t.modules(bmod, amods)
        t.rest()
        tensor_pairs.extend(t.pairs)
        matched_a.update(n for p in t.pairs for n in p.a)
        matched_b.update(n for p in t.pairs for n in p.b)
    _layout_outliers(tensor_pairs, a, b)
    pairs.extend(tensor_pairs)
    kinds = ("activation", "param", "buffer")
    una = [f"{k} {x.name}" for k in kinds for x in fa.get(k, []) if x.name not in matched_a]
    unb = [f"{k} {x.name}" for k in kinds for x in fb.get(k, []) if x.name not in matched_b]
    keys_b = list(dict.fromkeys((k.kind, k.name) for k in b.keys))
    classes_a = dict(getattr(a, "module_classes", {}) or {})
    classes_b = dict(getattr(b, "module_classes", {}) or {})
    return Proposal(pairs, una, unb, keys_b, classes_a, classes_b)


def _reorder(items: list[Item], grads: list[Item]) -> list[Item]:
    """Parameters in the order their gradients appear in the backward pass (then the rest)."""
    pos = {g.name: i for i, g in enumerate(grads)}
    return sorted(items, key=lambda it: pos.get(it.name, len(pos)))


def _layout_outliers(pairs: list[Pair], a: Run, b: Run) -> None:
    """Flag a weight paired with a layout unlike its siblings' (same classes, same leaf names).

    Seven ``TLinear.W -> Linear.weight`` pairs transposed and one not: that one is either laid
    out differently on purpose or copied without its transpose (a port bug); it is marked
    ambiguous so that the report and ``graddiff map`` name it.
    """
    ca = getattr(a, "module_classes", {}) or {}
    cb = getattr(b, "module_classes", {}) or {}
    groups: dict[tuple[str, ...], list[Pair]] = {}
    for p in pairs:
        if len(p.a) != 1 or len(p.b) != 1 or "." not in p.a[0] or "." not in p.b[0]:
            continue
        (mb, lb), (ma, la) = p.b[0].rsplit(".", 1), p.a[0].rsplit(".", 1)
        if mb in cb and ma in ca:
            groups.setdefault((str(cb[mb]), lb, str(ca[ma]), la), []).append(p)
    for (kb, lb, ka, la), ps in groups.items():
        flipped = [p for p in ps if p.transpose]
        plain = [p for p in ps if not p.transpose]
        if not flipped or not plain:
            continue
        for odd, usual, how in ((flipped, plain, "untransposed"), (plain, flipped, "transposed")):
            if len(odd) > len(usual):
                continue
            for p in odd:
                p.ambiguous = True
                p.confidence *= 0.5
                p.evidence += (
                    f"; unlike {len(usual)} other {kb}.{lb} -> {ka}.{la} pair(s), {how} "
                    f"(a weight copied with the wrong layout?)"
                )
