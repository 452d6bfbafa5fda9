"""A short, ordinary TRL GRPO script. tests/test_trainer.py runs it as is, and with the two class
names swapped for EggrollConfig / EggrollTrainer (and the import), to show the drop-in."""
import sys

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

model_path, output_dir = sys.argv[1], sys.argv[2]
dataset = Dataset.from_dict({"prompt": ["abc", "bca", "cab", "hgf"], "target": ["a", "b", "c", "h"]})


def reward_target(completions, target, **kwargs):
    return [c.count(t) / max(len(c), 1) for c, t in zip(completions, target)]


training_args = GRPOConfig(
    output_dir=output_dir, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
    max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
    gradient_checkpointing=False, save_strategy="no", seed=0,
)
trainer = GRPOTrainer(model=model_path, reward_funcs=reward_target, args=training_args, train_dataset=dataset)
trainer.train()
print("FINAL_REWARD", trainer.state.log_history[-2]["reward"])
