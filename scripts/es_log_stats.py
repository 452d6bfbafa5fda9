"""What an EGGROLL run's log says about its signal and step size (the figures quoted in
docs/benchmarks.md, "Head-to-head with GRPO").

    python scripts/es_log_stats.py runs/compare_grpo/runs/eggroll/log.txt --learning_rate 3e-6

Prints, over the logged ES steps: ``frac_reward_zero_std`` (share of a step's prompts on which every
member got the same reward: those prompts carry no signal), ``es/update_norm`` (norm of the ES
direction ``g``), and, with ``--learning_rate``, the step ``lr * ||g||`` relative to the norm of the
perturbed weights of the base model (``--model``, default the tiny Countdown base).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def logged(text: str, key: str) -> list[float]:
    """Every value of ``key`` in the trainer's printed log dictionaries."""
    return [float(v) for v in re.findall(rf"'{re.escape(key)}': '([-+0-9.e]+)'", text)]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--learning_rate", type=float, default=None)
    ap.add_argument("--model", default="tiny-countdown-base")
    a = ap.parse_args(argv)
    text = Path(a.log).read_text()
    zero, norm = logged(text, "frac_reward_zero_std"), logged(text, "es/update_norm")
    if not zero or not norm:
        sys.exit(f"{a.log}: no frac_reward_zero_std / es/update_norm entries (an EGGROLL run log with logging_steps=1?)")
    out = {"steps": len(zero), "frac_reward_zero_std_mean": statistics.mean(zero),
           "frac_reward_zero_std_quartiles": statistics.quantiles(zero, n=4),
           "update_norm_median": statistics.median(norm)}
    if a.learning_rate is not None:
        from transformers import AutoModelForCausalLM

        from eggroll_ft.population import select_linear_modules

        import rewards  # noqa: F401  (registers the named model tiny-countdown-base)
        from eggroll_ft.models.named import resolve_model_name

        model = AutoModelForCausalLM.from_pretrained(resolve_model_name(a.model))
        weight_norm = sum(float(m.weight.detach().pow(2).sum()) for m in select_linear_modules(model).values()) ** 0.5
        out.update(weight_norm=weight_norm, step_over_weight_norm=a.learning_rate * out["update_norm_median"] / weight_norm)
    for k, v in out.items():
        print(f"{k}: {[round(x, 3) for x in v] if isinstance(v, list) else round(v, 4)}")
    return out


if __name__ == "__main__":
    main()
