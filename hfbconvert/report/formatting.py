"""How report figures are written as text (shared by Markdown, HTML and the terminal)."""

from __future__ import annotations

NA = "n/a"
COST_KEYS = ("muls", "adds", "params", "bytes", "energy_pj", "energy_with_weight_reads_pj")


def fmt_count(n: float | None) -> str:
    """Operation/parameter counts with k/M/G suffixes (tables stay narrow)."""
    if n is None:
        return NA
    a = abs(n)
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{n / div:.3g}{suf}"
    return f"{n:.0f}"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return NA
    for div, suf in ((2**20, "MiB"), (2**10, "KiB")):
        if abs(b) >= div:
            return f"{b / div:.3g} {suf}"
    return f"{b:.0f} B"


def fmt_energy(pj: float | None) -> str:
    """Picojoules scaled to pJ/nJ/µJ/mJ."""
    if pj is None:
        return NA
    for div, suf in ((1e9, "mJ"), (1e6, "µJ"), (1e3, "nJ")):
        if abs(pj) >= div:
            return f"{pj / div:.3g} {suf}"
    return f"{pj:.3g} pJ"


def fmt_change(rel: float | None) -> str:
    """Relative change (after/before − 1) as a signed percentage."""
    if rel is None:
        return NA
    return f"{rel * 100:+.1f}%"


def fmt_num(x: float | None, spec: str = ".3g") -> str:
    return NA if x is None else format(x, spec)


def fmt_pair(before: str, after: str) -> str:
    return f"{before} → {after}"


WEIGHT_STORAGE = {32: "float32", 16: "float16",
                  8: "int8 (per output channel, one fp32 scale each)"}
FORMATTERS = {"muls": fmt_count, "adds": fmt_count, "params": fmt_count, "bytes": fmt_bytes,
              "energy_pj": fmt_energy, "energy_with_weight_reads_pj": fmt_energy}
COST_LABELS = {"muls": "MULs", "adds": "ADDs", "params": "parameters", "bytes": "weight bytes",
               "energy_pj": "energy (arithmetic)",
               "energy_with_weight_reads_pj": "energy (+ weight reads)"}
