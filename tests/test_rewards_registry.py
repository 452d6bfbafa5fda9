"""Addressing rewards by name: the library's one registry (filled by ``import rewards``),
module:function and path/to/file.py:function."""
import pytest

import rewards  # noqa: F401  (registers the task rewards)
from eggroll_ft.reward_funcs import REWARD_FUNCS, register_reward_func, resolve_reward_func
from rewards.arithmetic import arithmetic_format_reward, arithmetic_reward
from rewards.countdown import countdown_format_reward, countdown_reward
from rewards.gsm8k import gsm8k_reward


def test_registered_names():
    names = ("countdown", "countdown_format", "gsm8k", "arithmetic", "arithmetic_format")
    assert {k: REWARD_FUNCS[k] for k in names} == {
        "countdown": countdown_reward, "countdown_format": countdown_format_reward, "gsm8k": gsm8k_reward,
        "arithmetic": arithmetic_reward, "arithmetic_format": arithmetic_format_reward}
    for name, func in REWARD_FUNCS.items():
        assert resolve_reward_func(name) is func
    assert resolve_reward_func(" gsm8k ") is gsm8k_reward
    assert resolve_reward_func(len) is len  # a callable passes through


def test_register_a_task_reward(monkeypatch):
    monkeypatch.setattr("eggroll_ft.reward_funcs.REWARD_FUNCS", dict(REWARD_FUNCS))

    def parity_reward(completions, **kwargs):
        return [float(len(c) % 2 == 0) for c in completions]

    register_reward_func("parity", parity_reward)
    register_reward_func("parity", parity_reward)  # the same function again (a module reloaded): fine
    assert resolve_reward_func("parity")(["ab", "abc"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="'countdown' is already registered"):
        register_reward_func("countdown", parity_reward)
    with pytest.raises(ValueError, match="reward name='a:b'"):
        register_reward_func("a:b", parity_reward)


def test_called_the_way_trl_calls_rewards():
    # GRPOTrainer passes prompts, completions, completion_ids, every dataset column, trainer_state and
    # the log_extra / log_metric callbacks
    from rewards.countdown import make_countdown_dataset

    ds = make_countdown_dataset(3, seed=0, template="chat")
    completions = [[{"role": "assistant", "content": f"<think>ok</think><answer>{s}</answer>"}]
                   for s in ds["solution"]]
    columns = {k: ds[k] for k in ds.column_names if k != "prompt"}
    kwargs = dict(prompts=ds["prompt"], completions=completions, completion_ids=[[1, 2]] * 3,
                  trainer_state=None, log_extra=lambda column, values: None, log_metric=lambda name, value: None,
                  **columns)
    assert resolve_reward_func("countdown")(**kwargs) == [1.0, 1.0, 1.0]
    assert resolve_reward_func("countdown_format")(**kwargs) == [1.0, 1.0, 1.0]
    gsm = dict(prompts=["Q"], completions=["#### 5"], completion_ids=[[1]], trainer_state=None,
               question=["Q"], answer=["2 + 3 = 5\n#### 5"])
    assert resolve_reward_func("gsm8k")(**gsm) == [1.0]


def test_module_function():
    assert resolve_reward_func("rewards.countdown:countdown_reward") is countdown_reward
    assert resolve_reward_func("rewards.gsm8k:gsm8k_reward")(["#### 3"], answer=["#### 3"]) == [1.0]


def test_file_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length_reward(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
                    "NOT_CALLABLE = 3\n")
    func = resolve_reward_func(f"{path}:length_reward")
    assert func(["ab", "abcd"]) == [2.0, 4.0]
    assert resolve_reward_func(f"{path}:length_reward") is func  # loaded once
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        resolve_reward_func(f"{path}:missing")
    with pytest.raises(ValueError, match="NOT_CALLABLE is a int, not callable"):
        resolve_reward_func(f"{path}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_reward_func(f"{tmp_path}/absent.py:f")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("countdwn", "not a registered name.*registered: .*countdown, countdown_format, .*gsm8k"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("rewards.countdown:nope", "has no attribute 'nope'"),
        ("rewards.countdown:", "must look like"),
        ("", "non-empty string"),
        (None, "non-empty string"),
    ],
)
def test_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_reward_func(spec)
