"""Diagnostic (not part of the package): does a chain of thought that spells out the yes/no and multiple-choice
lookups teach the tiny decoder to do them?

  python results/diagnostics/spelled_out_reasoning.py train    # 250 more SFT steps from workdir/default/sft
  python experiments/evaluate.py --config=configs/sft.py:tiny --splits=test --config.data.data_dir=workdir/default/data \
      --config.train.workdir=workdir/diagnostics/sft_spelled_out --config.rl.max_new_tokens=104
  python results/diagnostics/spelled_out_reasoning.py copy_rate  # does it restate the question's object?

The training examples' yes/no reasoning becomes "Is there a red circle? the small red triangle no, the large red
circle yes, so the answer is yes." and the multiple-choice ending "The answer is circle: A. circle yes, B. cross
no, ..., so the answer is option A." (words already in the warm start's vocabulary; up to 96 tokens, hence a
104-token completion budget).
"""

import json
import os
import re
import shutil
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [os.path.join(ROOT, "configs"), ROOT]

import noisygrpo  # noqa: E402
import sft as sft_config  # noqa: E402
from noisygrpo_jax.data import scenes  # noqa: E402
from noisygrpo_jax.evaluation import evaluate  # noqa: E402
from noisygrpo_jax.training import loops, setup  # noqa: E402

WARM_START = os.path.join(ROOT, "workdir/default/sft")
WORKDIR = os.path.join(ROOT, "workdir/diagnostics/sft_spelled_out")
DATA = os.path.join(ROOT, "workdir/default/data")


def _phrase(o):
  return f"{o['size']} {o['colour']} {o['shape']}"


def spelled_out(ex):
  scene = json.loads(ex["scene"])
  caption = scenes.caption(scene)
  reasoning = ex["cot"][len("<think>"):ex["cot"].index("</think>")][len(caption) + 1:]
  if ex["answer_type"] == "yes_no":
    colour, shape = re.match(r"Is there a (\w+) (\w+) in the image", ex["problem"]).groups()
    checks = ", ".join(f"the {_phrase(o)} {'yes' if (o['colour'], o['shape']) == (colour, shape) else 'no'}"
                       for o in scene["objects"])
    reasoning = f"Is there a {colour} {shape}? {checks}, so the answer is {ex['solution'].lower()}."
  elif ex["answer_type"] == "multiple_choice":
    body, last = reasoning.rsplit(" The answer ", 1)
    answer = re.match(r"(.+) is option [ABCD]\.$", last).group(1)
    options = re.findall(r"([ABCD])\. (\S+)", ex["problem"].split("choices:")[1])
    checks = ", ".join(f"{letter}. {value} {'yes' if value == answer else 'no'}" for letter, value in options)
    reasoning = f"{body} The answer is {answer}: {checks}, so the answer is option {ex['solution']}."
  return dict(ex, cot=f"<think>{caption} {reasoning}</think>\n<answer>{ex['solution']}</answer>")


def train():
  original = setup.load_split
  setup.load_split = lambda config, split: ([spelled_out(e) for e in original(config, split)] if split == "train"
                                            else original(config, split))
  c = sft_config.get_config("tiny")
  with c.unlocked():
    c.train.workdir, c.train.init_from, c.data.data_dir = WORKDIR, WARM_START, DATA
    c.optim.learning_rate, c.train.eval_every, c.rl.max_new_tokens = 5e-4, 0, 104
  os.makedirs(WORKDIR, exist_ok=True)
  if not os.path.exists(os.path.join(WORKDIR, "tokenizer")):  # the warm start's word ids
    shutil.copytree(os.path.join(WARM_START, "tokenizer"), os.path.join(WORKDIR, "tokenizer"))
  loops.run_sft(c)


def copy_rate():
  c = noisygrpo.get_config("tiny")
  with c.unlocked():
    c.train.workdir, c.data.data_dir, c.rl.max_new_tokens = WORKDIR, DATA, 104
  run = loops.Run(c, "eval")
  examples = [e for e in setup.load_split(c, "test") if e["answer_type"] == "yes_no"]
  model = run.model()
  completions = evaluate.answer(model, run.tokenizer, examples, setup.sampling_params(c, run.tokenizer, True),
                                setup.image_config(c, model.config.vision), batch_size=32,
                                prompt_buckets=tuple(c.data.prompt_buckets), patch_buckets=tuple(c.data.patch_buckets))
  asked = [re.match(r"Is there a (\w+) (\w+)", e["problem"]).groups() for e in examples]
  said = [re.search(r"Is there a (\w+) (\w+)\?", text) for text in completions]
  said = [m.groups() if m else (None, None) for m in said]
  n = len(examples)
  result = {"n": n, "object": sum(a == s for a, s in zip(asked, said)) / n,
            "colour": sum(a[0] == s[0] for a, s in zip(asked, said)) / n,
            "shape": sum(a[1] == s[1] for a, s in zip(asked, said)) / n}
  print(json.dumps(result))


if __name__ == "__main__":
  {"train": train, "copy_rate": copy_rate}[sys.argv[1]]()
