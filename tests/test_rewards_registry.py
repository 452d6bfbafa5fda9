"""Addressing rewards by name: registered names, module:function, path/to/file.py:function."""
import pytest

from rewards import REWARD_FUNCS, get_reward_func
from rewards.arithmetic import arithmetic_format_reward, arithmetic_reward
from rewards.countdown import countdown_format_reward, countdown_reward
from rewards.gsm8k import gsm8k_reward


def test_registered_names():
    assert REWARD_FUNCS == {"countdown": countdown_reward, "countdown_format": countdown_format_reward,
                            "gsm8k": gsm8k_reward, "arithmetic": arithmetic_reward,
                            "arithmetic_format": arithmetic_format_reward}
    for name, func in REWARD_FUNCS.items():
        assert get_reward_func(name) is func
    assert get_reward_func(" gsm8k ") is gsm8k_reward
    assert get_reward_func(len) is len  # a callable passes through


def test_called_the_way_trl_calls_rewards():
    # GRPOTrainer passes prompts, completions, completion_ids, every dataset column and trainer_state
    from rewards.countdown import make_countdown_dataset

    ds = make_countdown_dataset(3, seed=0, template="chat")
    completions = [[{"role": "assistant", "content": f"<think>ok</think><answer>{s}</answer>"}]
                   for s in ds["solution"]]
    columns = {k: ds[k] for k in ds.column_names if k != "prompt"}
    kwargs = dict(prompts=ds["prompt"], completions=completions, completion_ids=[[1, 2]] * 3,
                  trainer_state=None, **columns)
    assert get_reward_func("countdown")(**kwargs) == [1.0, 1.0, 1.0]
    assert get_reward_func("countdown_format")(**kwargs) == [1.0, 1.0, 1.0]
    gsm = dict(prompts=["Q"], completions=["#### 5"], completion_ids=[[1]], trainer_state=None,
               question=["Q"], answer=["2 + 3 = 5\n#### 5"])
    assert get_reward_func("gsm8k")(**gsm) == [1.0]


def test_module_function():
    assert get_reward_func("rewards.countdown:countdown_reward") is countdown_reward
    assert get_reward_func("rewards.gsm8k:gsm8k_reward")(["#### 3"], answer=["#### 3"]) == [1.0]


def test_file_function(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def length_reward(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
                    "NOT_CALLABLE = 3\n")
    func = get_reward_func(f"{path}:length_reward")
    assert func(["ab", "abcd"]) == [2.0, 4.0]
    assert get_reward_func(f"{path}:length_reward") is func  # loaded once
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward_func(f"{path}:missing")
    with pytest.raises(ValueError, match="NOT_CALLABLE is a int, not callable"):
        get_reward_func(f"{path}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="does not exist"):
        get_reward_func(f"{tmp_path}/absent.py:f")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("countdwn", "not a registered name \\(countdown, countdown_format, gsm8k, arithmetic, arithmetic_format\\)"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("rewards.countdown:nope", "has no attribute 'nope'"),
        ("rewards.countdown:", "must look like"),
        ("", "non-empty string"),
        (None, "non-empty string"),
    ],
)
def test_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        get_reward_func(spec)
