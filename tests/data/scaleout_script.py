"""Short ES run used by tests/test_scaleout.py under 1 and 2 processes.

usage: python scaleout_script.py OUT_DIR [--fail-rank R] [--die-rank R] [--steps S] [--resume CKPT] [--save-steps K]
                                  [--no-use-cpu] [--eval]
Writes OUT_DIR/result.json (rank 0): sha256 of the final weights and the logged rewards; with --eval
also the eval metrics and, per rank, how many eval completions that rank scored. The reward logs a
completions-table column (TRL's log_extra). --no-use-cpu leaves use_cpu at its default (False).
"""
import argparse
import hashlib
import json
import os

from datasets import Dataset

from eggroll_ft import EggrollConfig, EggrollTrainer
from eggroll_ft.testing import char_tokenizer, tiny_llama

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--fail-rank", type=int, default=-1)
p.add_argument("--die-rank", type=int, default=-1)
p.add_argument("--steps", type=int, default=3)
p.add_argument("--resume", default=None)
p.add_argument("--save-steps", type=int, default=0)
p.add_argument("--no-use-cpu", action="store_true")
p.add_argument("--eval", action="store_true")
a = p.parse_args()

tok = char_tokenizer("abcdefgh ")
model = tiny_llama(len(tok), init_std=0.5)
ds = Dataset.from_dict({"prompt": ["abc", "hgf", "dde", "bag", "cab", "fed"], "target": list("aabbcc")})
eval_ds = Dataset.from_dict({"prompt": ["ab", "hh", "gfe", "cc", "dab", "e", "bbb", "fa"], "target": list("abcdefgh")})
scored = []  # completions this process scored


def target_fraction(completions, target, log_extra=None, **kwargs):
    if int(os.environ.get("RANK", "0")) == a.fail_rank:
        raise ValueError("reward server unreachable on this rank")
    if int(os.environ.get("RANK", "0")) == a.die_rank:
        os._exit(3)  # the process vanishes without a word
    scored.append(len(completions))
    log_extra("target_count", [c.count(t) for c, t in zip(completions, target)])
    return [c.count(t) / max(len(c), 1) for c, t in zip(completions, target)]


args = EggrollConfig(output_dir=a.out, max_steps=a.steps, population_size=8, sigma=0.2, learning_rate=0.1,
                     prompts_per_step=2, max_completion_length=6, max_sequences_in_flight=4, report_to="none",
                     use_cpu=not a.no_use_cpu, logging_steps=1, disable_tqdm=True, seed=0, es_debug_checksum=True,
                     log_completions=True,
                     save_strategy="steps" if a.save_steps else "no", save_steps=a.save_steps or 500, ddp_timeout=120)
trainer = EggrollTrainer(model, target_fraction, args=args, train_dataset=ds, processing_class=tok,
                         eval_dataset=eval_ds if a.eval else None)
trainer.train(resume_from_checkpoint=a.resume)
if a.eval:
    scored.clear()
    eval_metrics = trainer.evaluate()
    with open(os.path.join(a.out, f"eval_scored_rank{trainer.accelerator.process_index}.json"), "w") as f:
        json.dump(sum(scored), f)
if trainer.is_world_process_zero():
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    rewards = [x["reward"] for x in trainer.state.log_history if "reward" in x]
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump({"weights_sha256": h.hexdigest(), "rewards": rewards, "use_cpu": args.use_cpu,
                   "world_size": trainer.accelerator.num_processes, "eval": eval_metrics if a.eval else None}, f)
