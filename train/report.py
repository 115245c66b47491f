"""Plain-text / Markdown tables of run summaries (metrics.json)."""
from __future__ import annotations

COLUMNS = ("energy", "mmd", "sliced_w2", "ksd", "mode_weight_error", "fd", "kid_mean", "nn_ratio", "frac_copies",
           "seconds")


def _fmt(v):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def sampler_table(summary: dict) -> str:
    """Markdown table: one row per sampler of one run."""
    cols = [c for c in COLUMNS if any(c in m for m in summary["samplers"].values())]
    if "fd_real" in summary:  # image data: no exact score
        head = (f"{summary['method']} on {summary['data']}, {summary['steps']} steps; FD/KID in the feature space of a "
                f"classifier trained on the data (accuracy {_fmt(summary['classifier_accuracy'])}; held-out vs "
                f"training FD {_fmt(summary['fd_real'])}); bits/dim {_fmt((summary.get('bpd') or {}).get('mean'))}")
    else:
        head = (f"{summary['method']} on {summary['data']}, {summary['steps']} steps; mean relative Fisher error of the "
                f"network over levels: {_fmt((summary.get('fisher') or {}).get('fisher_net_mean'))}")
    lines = [head, "",
             "| sampler | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in summary["samplers"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def method_table(summaries: dict[str, dict], sampler: str = "annealed") -> str:
    """Markdown table: one row per method (run), the given sampler's metrics and the training cost."""
    lines = ["| method | energy | MMD² | sliced W2 | KSD² | mode-weight error | Fisher error (net) | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for method, s in summaries.items():
        m = s["samplers"].get(sampler, {})
        f = (s.get("fisher") or {}).get("fisher_net_mean")
        lines.append(f"| {method} | " + " | ".join(_fmt(m.get(k)) for k in ("energy", "mmd", "sliced_w2", "ksd",
                                                                          "mode_weight_error"))
                     + f" | {_fmt(f)} | {_fmt(s.get('sec_per_step'))} |")
    return "\n".join(lines)


def panel_table(table: dict[str, dict]) -> str:
    """Markdown table of the comparison panels (name -> metrics)."""
    lines = ["| samples | energy | MMD² | sliced W2 | mode-weight error |", "|---|---|---|---|---|"]
    for name, m in table.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in ("energy", "mmd", "sliced_w2", "mode_weight_error"))
                     + " |")
    return "\n".join(lines)
