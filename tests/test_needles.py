"""The synthetic needle task (train/needles.py): every sample obeys its rules, checked by parsing the text;
the "needles" data kind feeds it to training and evaluation."""

import re

import numpy as np
import pytest

from train import data, needles, toy


def parse(task: needles.NeedleTask, row: dict, depth: float | None = None):
    """Assert every rule of one sample (a dict of [T] arrays); return (keys, values, asked key)."""
    t, k, v = task.seq_len, task.key_len, task.value_len
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)]:
        assert row[key].shape == (t,) and row[key].dtype == dtype, key
    np.testing.assert_array_equal(row["targets"][:-1], row["inputs"][1:])
    chars = needles.decode(np.concatenate([row["inputs"], row["targets"][-1:]]))
    assert len(chars) == t + 1 and chars[0] == "^" and chars[-1] == "$"  # no padding
    haystack, question = chars[1:-1].split("?")
    found = re.findall(rf"@([a-p]{{{k}}})=([0-9]{{{v}}})", haystack)
    assert len(found) == task.num_needles
    keys = [key for key, _ in found]
    assert len(set(keys)) == len(keys)  # distinct keys
    filler = re.sub(rf"@[a-p]{{{k}}}=[0-9]{{{v}}}", "", haystack)
    assert set(filler) <= set(needles.LETTERS) and len(filler) == task.num_filler
    assert len(haystack) == task.haystack_len
    match = re.fullmatch(rf"([a-p]{{{k}}})=([0-9]{{{v}}})", question)
    assert match, question
    asked, answer = match.groups()
    assert dict(found)[asked] == answer
    # the answer's digits, and nothing else, are weighted
    assert needles.decode(row["targets"][row["weights"] > 0]) == answer
    assert set(np.unique(row["weights"])) <= {0.0, 1.0}
    # the filler before the asked needle is round(depth * F)
    before = re.sub(rf"@[a-p]{{{k}}}=[0-9]{{{v}}}", "", haystack[: haystack.index(f"@{asked}=")])
    if depth is not None:
        assert len(before) == round(depth * task.num_filler)
    return keys, [value for _, value in found], asked


def test_vocabulary():
    assert needles.VOCAB_SIZE == 32 == len(set(needles.VOCAB))
    text = "^ab@cd=12?cd=12_$"
    assert needles.decode(needles.encode(text)) == text
    with pytest.raises(ValueError, match="text='aZ' is invalid"):
        needles.encode("aZ")
    with pytest.raises(ValueError, match=r"ids=\[0, 32\] is invalid"):
        needles.decode([0, 32])


@pytest.mark.parametrize("n, k, v, t", [(2, 2, 2, 64), (4, 2, 2, 64), (6, 1, 3, 80), (1, 3, 1, 16)])
def test_samples_obey_the_rules_over_many_seeds(rng, n, k, v, t):
    task = needles.NeedleTask(t, n, k, v)
    depths = []
    for _ in range(40):
        seed, index = int(rng.integers(2**31)), int(rng.integers(2**40))
        depth = float(rng.choice([0.0, 1.0, rng.random()]))
        keys, values, asked = parse(task, task.sample(seed, index, depth), depth)
        # the same (seed, index) at another depth moves only the needles: same keys, values, question
        keys2, values2, asked2 = parse(task, task.sample(seed, index, 0.5), 0.5)
        assert (sorted(zip(keys, values, strict=True)), asked) == (
            sorted(zip(keys2, values2, strict=True)),
            asked2,
        )
        row = task.sample(seed, index)
        np.testing.assert_array_equal(row["inputs"], task.sample(seed, index)["inputs"])  # pure function
        parse(task, row)
        sample = task.draw(seed, index)
        depths.append(sample.filler_before_asked / max(task.num_filler, 1))
        for i, start in enumerate(sample.starts):
            assert sample.text[start : start + task.needle_len] == f"@{sample.keys[i]}={sample.values[i]}"
    assert 0.0 <= min(depths) <= max(depths) <= 1.0 and len(set(depths)) >= min(5, task.num_filler + 1)


def test_depth_zero_and_one_put_the_asked_needle_first_and_last(seed):
    task = needles.NeedleTask(64, 4, 2, 2)
    for index in range(10):
        first, last = task.draw(seed, index, 0.0), task.draw(seed, index, 1.0)
        assert first.starts[first.asked] == 0
        assert last.starts[last.asked] + task.needle_len == task.haystack_len


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match=r"seq_len=18 is invalid: 2 needle\(s\) .* need seq_len >= 19"):
        needles.NeedleTask(18, 2, 2, 2)
    with pytest.raises(ValueError, match=r"num_needles=17 is invalid: must be an integer in \[1, 16\]"):
        needles.NeedleTask(400, 17, 1, 2)
    with pytest.raises(ValueError, match="key_len=0 is invalid"):
        needles.NeedleTask(64, 2, 0, 2)
    with pytest.raises(ValueError, match="depth=1.5 is invalid: must be a number in"):
        needles.NeedleTask(64, 2, 2, 2).sample(0, 0, 1.5)
    with pytest.raises(ValueError, match="data.needles_count=0 is invalid"):
        data.DataConfig(kind="needles", seq_len=64, needles_count=0)
    with pytest.raises(ValueError, match=r"data.seq_len=16 is invalid: .* need seq_len >= 19"):
        data.DataConfig(kind="needles", seq_len=16)
    data.DataConfig(kind="toy", seq_len=16, toy_answer="last")  # the needle seq_len rule is for needles only


def test_the_needles_data_kind_feeds_training_and_evaluation(seed):
    cfg = data.DataConfig(kind="needles", seq_len=48, needles_count=3, needles_value_len=1, shuffle=False)
    assert data.vocab_size(cfg) == needles.VOCAB_SIZE
    task = cfg.needle_task()
    assert (task.seq_len, task.num_needles, task.key_len, task.value_len) == (48, 3, 2, 1)
    batch = next(data.train_iterator(cfg, 4, seed=seed))
    for i in range(4):
        row = {key: value[i] for key, value in batch.items()}
        np.testing.assert_array_equal(row["inputs"], task.sample(seed, i)["inputs"])
        parse(task, row)
    (held_out,) = data.eval_batches(cfg, 4, 1, seed=seed)
    for i in range(4):
        np.testing.assert_array_equal(
            held_out["inputs"][i], task.sample(seed, data.TOY_EVAL_START + i)["inputs"]
        )
    # the teacher-forced sequence error sees only the answer: right answers, wrong elsewhere -> 0
    predictions = np.where(held_out["weights"] > 0, held_out["targets"], (held_out["targets"] + 1) % 32)
    assert toy.sequence_error(predictions, held_out["targets"], held_out["weights"]) == 0.0
    predictions[1, np.flatnonzero(held_out["weights"][1])[-1]] += 1
    assert toy.sequence_error(predictions, held_out["targets"], held_out["weights"]) == 0.25
