"""Per-layer workloads for the accelerator model, from a PyTorch model (plain or hybrid)
or from an exported ONNX file (``hfb::StrassenPointwise`` nodes read with their packed
``W_b``/``W_c`` so the ternary densities are those of the file that ships).

A layer is one or more *parts*, each a ZigZag-shaped loop nest on one array:
- dense conv / depthwise / pointwise / linear: one part on the MAC array;
- hybrid pointwise: the critical filters (1x1, n_c outputs) on the MAC array, and the
  ternary bank's ``W_b`` (r x c_in) then ``W_c`` (n_t x r) on the adder array, with the
  ``r`` scale MULs by ``a`` per pixel priced separately (``scale_muls``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError


@dataclass
class Part:
    name: str
    unit: str          # "mac" | "adder"
    stage: str         # dense | critical | wb | wc
    k: int             # output channels (1 for depthwise, which uses g)
    c: int             # input channels per group
    g: int = 1         # groups (depthwise channels)
    ox: int = 1
    oy: int = 1
    fx: int = 1
    fy: int = 1
    stride: int = 1
    i_bits: int = 32
    w_bits: int = 32
    o_bits: int = 32   # partial-sum precision
    of_bits: int = 32  # stored output precision
    density: float = 1.0  # non-zero fraction of the weights (ternary parts)

    @property
    def ops(self) -> int:
        return self.k * self.c * self.g * self.ox * self.oy * self.fx * self.fy

    def act_bits_in_out(self) -> tuple[int, int]:
        ix = (self.ox - 1) * self.stride + self.fx
        iy = (self.oy - 1) * self.stride + self.fy
        cin = self.c * self.g
        return cin * ix * iy * self.i_bits, self.k * self.g * self.ox * self.oy * self.of_bits

    def weight_bits(self) -> int:
        return self.k * self.c * self.g * self.fx * self.fy * self.w_bits


@dataclass
class Layer:
    name: str
    kind: str                  # conv | depthwise | pointwise | linear | hybrid
    parts: list[Part]
    scale_muls: int = 0        # multiplications by ``a`` per inference (hybrid)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "scale_muls": self.scale_muls,
                "parts": [asdict(p) | {"ops": p.ops} for p in self.parts], **self.extra}


def _bits(act_bits: int, fp_bits: int) -> tuple[int, int, int]:
    """(input/weight bits, partial-sum bits, stored output bits) of dense arithmetic."""
    if act_bits == 8:
        return 8, 32, 8
    return fp_bits, fp_bits, fp_bits


def dense_part(name, kind, k, c, g, ox, oy, f, stride, act_bits, fp_bits) -> Part:
    b, o, of = _bits(act_bits, fp_bits)
    return Part(name, "mac", "dense", k, c, g, ox, oy, f, f, stride, b, b, o, of)


def hybrid_parts(name, c_in, n_c, n_t, r, ox, oy, stride, act_bits, fp_bits, hidden_bits,
                 dens_b, dens_c) -> list[Part]:
    b, o, of = _bits(act_bits, fp_bits)
    parts = []
    if n_c:
        parts.append(Part(name + ".critical", "mac", "critical", n_c, c_in, 1, ox, oy, 1, 1,
                          stride, b, b, o, of))
    if n_t and r:
        # W_b: activations in, ternary weights, hidden units out (int32 unless --hidden-bits 8)
        hb = hidden_bits if act_bits == 8 else fp_bits
        parts.append(Part(name + ".wb", "adder", "wb", r, c_in, 1, ox, oy, 1, 1, stride, b, 2,
                          o, hb, dens_b))
        parts.append(Part(name + ".wc", "adder", "wc", n_t, r, 1, ox, oy, 1, 1, 1, hb, 2, o, of,
                          dens_c))
    return parts


# ---------------------------------------------------------------------- PyTorch models

def _module_layer(name: str, mod, fam: str, out, abits: int, fp_bits: int) -> Layer | None:
    """The workload of one hooked module (``fam``: its handler family) given its output."""
    if fam == "hybrid":
        if out.dim() == 4:
            oy, ox = int(out.shape[2]), int(out.shape[3])
        else:
            oy, ox = 1, int(out[0].numel() // out.shape[-1])
        tb, _, tc = mod.ternary_factors()
        n_t = int(mod.tolerant_idx.numel())
        db = float((tb != 0).float().mean()) if n_t else 0.0
        dc = float((tc != 0).float().mean()) if n_t else 0.0
        hq = getattr(mod, "hidden_quant", None)
        hbits = 8 if hq else 32
        parts = hybrid_parts(name, mod.c_in, int(mod.n_critical), n_t, mod.r, ox, oy,
                             getattr(mod, "stride", 1), abits, fp_bits, hbits, db, dc)
        return Layer(name, "hybrid", parts, scale_muls=mod.r * ox * oy if n_t else 0,
                     extra={"c_in": mod.c_in, "c_out": mod.c_out,
                            "critical": int(mod.n_critical), "r": mod.r})
    if fam == "conv":
        oy, ox = int(out.shape[2]), int(out.shape[3])
        dw = mod.groups == mod.in_channels and mod.groups > 1
        f = mod.kernel_size[0]
        kind = "depthwise" if dw else ("pointwise" if f == 1 and mod.groups == 1 else "conv")
        if dw:
            p = dense_part(name, kind, 1, 1, mod.groups, ox, oy, f, mod.stride[0], abits,
                           fp_bits)
        else:
            p = dense_part(name, kind, mod.out_channels, mod.in_channels // mod.groups, 1, ox,
                           oy, f, mod.stride[0], abits, fp_bits)
        return Layer(name, kind, [p])
    if fam == "linear":
        p = dense_part(name, "linear", mod.out_features, mod.in_features, 1, 1, 1, 1, 1,
                       abits, fp_bits)
        return Layer(name, "linear", [p])
    return None


def from_model(model, resolution: int, fp_bits: int = 32) -> list[Layer]:
    """Walk one forward pass of ``model`` and describe every Conv2d, Linear and hybrid."""
    import torch

    from ..actquant import model_act_bits
    from ..handlers import family, layer_modules

    abits = model_act_bits(model)
    layers: list[Layer] = []

    def hook_for(name, mod):
        fam = family(mod)

        def hook(_m, inp, out):
            lay = _module_layer(name, mod, fam, out, abits, fp_bits)
            if lay is not None:
                layers.append(lay)
        return hook

    hooks = []
    for name, mod, _ in layer_modules(model):
        hooks.append(mod.register_forward_hook(hook_for(name, mod)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution))
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return layers


# ---------------------------------------------------------------------- ONNX files

def _shapes(mp, wanted: list[str]) -> dict[str, list[int]]:
    """Shapes of ``wanted`` tensors: one onnxruntime run on zeros (the ``hfb`` functions
    run as their standard-op bodies), since ONNX shape inference loses H/W at the TF-style
    Pad nodes."""
    import copy

    import numpy as np
    import onnx
    import onnxruntime as ort

    m = copy.deepcopy(mp)
    have = {o.name for o in m.graph.output}
    for name in wanted:
        if name not in have:
            m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    inp = m.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
            for d in inp.type.tensor_type.shape.dim]
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(wanted, {inp.name: np.zeros(dims, dtype=np.float32)})
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
        raise InputError(f"could not run the ONNX file to read its layer shapes "
                         f"({str(exc).splitlines()[0][:160]})") from None
    return {n: list(o.shape) for n, o in zip(wanted, outs)}


def _load_onnx(path: str):
    import onnx

    try:
        return onnx.load(path)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable ONNX file ({exc})") from None


def _attr(n, key: str, default: Any = None) -> Any:
    import onnx

    for a in n.attribute:
        if a.name == key:
            return onnx.helper.get_attribute_value(a)
    return default


def _scope(n) -> str:
    """"/blocks.6/conv_pw/Conv" -> "/blocks.6/conv_pw" (the exporter's module scope)."""
    return n.name.rsplit("/", 1)[0] if "/" in n.name else ""


class _OnnxGraph:
    """An exported graph's lookups: weights behind Cast/DequantizeLinear chains, tensors
    behind quantize pairs, the arithmetic (int8 if the graph quantizes activations, else
    the float bits of its Conv weights' storage) and ternary densities of packed banks."""

    def __init__(self, mp) -> None:
        import onnx

        g = self.graph = mp.graph
        self.inits = {t.name: t for t in g.initializer}
        for n in g.node:  # Constant nodes (weights stored through a Cast) count as initializers
            if n.op_type == "Constant" and n.attribute and n.attribute[0].t.dims:
                self.inits[n.output[0]] = n.attribute[0].t
        self.producers = {o: n for n in g.node for o in n.output}
        # int8 activations: QuantizeLinear (--qdq) or the fake-quantization Round of the graph
        self.act_bits = 8 if any(n.op_type in ("QuantizeLinear", "Round")
                                 and n.domain in ("", "ai.onnx") for n in g.node) else 32
        self.fp_bits = 32
        for n in g.node:
            if n.op_type == "Cast" and _attr(n, "to") == onnx.TensorProto.FLOAT and \
                    n.input[0] in self.inits and \
                    self.inits[n.input[0]].data_type == onnx.TensorProto.FLOAT16:
                self.fp_bits = 16

    def weight(self, name: str):
        from onnx import numpy_helper

        seen = 0
        while name not in self.inits and name in self.producers and seen < 4:
            n = self.producers[name]
            if n.op_type not in ("Cast", "DequantizeLinear", "Identity"):
                break
            name, seen = n.input[0], seen + 1
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def src(self, t: str) -> str:
        """The tensor behind quantize/dequantize pairs."""
        seen = 0
        while t in self.producers and self.producers[t].op_type in (
                "DequantizeLinear", "QuantizeLinear", "Identity") and seen < 4:
            t, seen = self.producers[t].input[0], seen + 1
        return t

    def density(self, node, idx: int, rows: int, cols: int) -> float:
        """Non-zero fraction of the packed ternary matrix at ``node.input[idx]``."""
        import numpy as np
        import torch

        from ..ternary import unpack_2bit, unpack_base3

        w = self.weight(node.input[idx])
        if w is None:
            return 1.0
        unpack = unpack_2bit if _attr(node, "packing", b"2bit") in (b"2bit", "2bit") \
            else unpack_base3
        vals = unpack(torch.as_tensor(np.array(w, dtype=np.uint8)), rows * cols)
        return float((vals != 0).float().mean())

    def pair_banks(self) -> tuple[dict[int, Any], set[int]]:
        """Each ``hfb::StrassenPointwise`` paired with its layer's critical 1x1 Conv or
        Gemm/MatMul (same exporter scope, else the same input): {id(dense node): bank},
        and the ids of the banks paired."""
        strassen = [n for n in self.graph.node
                    if n.op_type == "StrassenPointwise" and n.domain == "hfb"]
        by_input = {self.src(n.input[0]): n for n in strassen}
        by_scope = {_scope(n): n for n in strassen if _scope(n)}
        paired: dict[int, Any] = {}
        used: set[int] = set()
        for n in self.graph.node:
            if n.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            w = self.weight(n.input[1])
            if w is None or (n.op_type == "Conv" and (w.shape[-1] != 1 or
                                                      int(_attr(n, "group", 1)) != 1)):
                continue
            sp = by_scope.get(_scope(n)) if _scope(n) else None
            if sp is None:
                sp = by_input.get(self.src(n.input[0]))
            if sp is not None and id(sp) not in used:
                used.add(id(sp))
                paired[id(n)] = sp
        return paired, used

    def hybrid(self, name: str, sp, n_c: int, ox: int, oy: int, stride: int) -> Layer:
        """A hybrid layer: ``n_c`` critical filters (0: none) and the bank ``sp``."""
        c_in, r, n_t = int(_attr(sp, "c_in")), int(_attr(sp, "r")), int(_attr(sp, "c_out"))
        hidden_bits = 8 if len(sp.input) > 5 and sp.input[5] else 32
        db = self.density(sp, 1, r, c_in)
        dc = self.density(sp, 2, n_t, r)
        parts = hybrid_parts(name, c_in, n_c, n_t, r, ox, oy, stride, self.act_bits,
                             self.fp_bits, hidden_bits, db, dc)
        return Layer(name, "hybrid", parts, scale_muls=r * ox * oy,
                     extra={"c_in": c_in, "c_out": n_c + n_t, "critical": n_c, "r": r})


def _conv_layer(gr: _OnnxGraph, n, name: str, out: list[int] | None, sp, path: str) -> Layer:
    w = gr.weight(n.input[1])
    if w is None or out is None or len(out) != 4:
        raise InputError(f"{path}: Conv {name}: weight or output shape unknown")
    k, cg, fy, fx = (int(v) for v in w.shape)
    groups = int(_attr(n, "group", 1))
    stride = int((_attr(n, "strides", [1, 1]) or [1])[0])
    oy, ox = int(out[2]), int(out[3])
    if sp is not None:
        return gr.hybrid(name, sp, k, ox, oy, stride)
    if groups > 1 and groups == k and cg == 1:
        p = dense_part(name, "depthwise", 1, 1, groups, ox, oy, fx, stride, gr.act_bits,
                       gr.fp_bits)
        return Layer(name, "depthwise", [p])
    kind = "pointwise" if fx == 1 and groups == 1 else "conv"
    p = dense_part(name, kind, k, cg, 1, ox, oy, fx, stride, gr.act_bits, gr.fp_bits)
    return Layer(name, kind, [p])


def _dense_matmul_layer(gr: _OnnxGraph, n, name: str, sp) -> Layer | None:
    w = gr.weight(n.input[1])
    if w is None:
        return None
    trans = int(_attr(n, "transB", 0)) if n.op_type == "Gemm" else 0
    k, c = (w.shape[0], w.shape[1]) if trans else (w.shape[1], w.shape[0])
    if sp is not None:
        return gr.hybrid(name, sp, int(k), 1, 1, 1)
    p = dense_part(name, "linear", int(k), int(c), 1, 1, 1, 1, 1, gr.act_bits, gr.fp_bits)
    return Layer(name, "linear", [p])


def from_onnx(path: str) -> list[Layer]:
    """Layers of an ONNX file written by ``hfbconvert export onnx``: every Conv and Gemm,
    and every ``hfb::StrassenPointwise`` (paired with the 1x1 Conv that reads the same
    input: the layer's critical filters). Int8 files (QuantizeLinear in the graph) are
    int8 arithmetic; float files at the bits of their Conv weights' storage."""
    mp = _load_onnx(path)
    gr = _OnnxGraph(mp)
    shapes = _shapes(mp, [n.output[0] for n in gr.graph.node
                          if n.op_type in ("Conv", "StrassenPointwise")])
    paired, used = gr.pair_banks()
    layers: list[Layer] = []
    for i, n in enumerate(gr.graph.node):
        name = n.name or f"node{i}"
        lay = None
        if n.op_type == "Conv":
            lay = _conv_layer(gr, n, name, shapes.get(n.output[0]), paired.get(id(n)), path)
        elif n.op_type in ("Gemm", "MatMul"):
            lay = _dense_matmul_layer(gr, n, name, paired.get(id(n)))
        elif n.op_type == "StrassenPointwise" and id(n) not in used and n.domain == "hfb":
            # a layer with no critical filters
            out = shapes.get(n.output[0], [1, 1, 1, 1])
            oy, ox = (int(out[2]), int(out[3])) if len(out) == 4 else (1, 1)
            used.add(id(n))
            lay = gr.hybrid(name, n, 0, ox, oy, 1)
        if lay is not None:
            layers.append(lay)
    if not layers:
        raise InputError(f"{path}: no Conv, Gemm or hfb::StrassenPointwise node to model")
    return layers
