"""Diagnostic (not part of the package): can the model reason from a right description of its image?

Each test example's chain of thought is started with the reference's first sentence, the exact scene description
("<think>The image shows 2 shapes on a plain background, from left to right: ..."), and the model continues
greedily from there. If the decoder reads its context, its answers should then be right far more often than
when it describes the scene itself (measured too, on the same examples); if it answers from the image alone,
they are not.

  python results/diagnostics/reasoning_probe.py <sft workdir> <data dir> <out.json> [examples]
  python results/diagnostics/reasoning_probe.py workdir/default/sft workdir/default/data \
      results/diagnostics/reasoning_probe_warm_start.json 500

The model is built from configs/sft.py:tiny (the `small` preset of the checkout it runs from), so a checkpoint of
another architecture needs the checkout that trained it.
"""

import json
import os
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path[:0] = [os.path.join(ROOT, "configs"), ROOT]

import numpy as np  # noqa: E402
import sft as sft_config  # noqa: E402
from noisygrpo_jax.data import scenes  # noqa: E402
from noisygrpo_jax.evaluation import evaluate, metrics  # noqa: E402
from noisygrpo_jax.processing import chat_template  # noqa: E402
from noisygrpo_jax.training import loops, setup  # noqa: E402

BATCH = 32
PROMPT_BUCKETS = (128, 160, 192)  # the RL prompt plus a description of up to 6 shapes


def caption_prefix(example) -> str:
  """"<think>" and the example's reference scene description (the first sentence of its chain of thought)."""
  return "<think>" + scenes.caption(json.loads(example["scene"]))


def described_prompts(tokenizer, examples, image_grids):
  """`evaluate.answer`'s prompts, each followed by its example's `caption_prefix`."""
  chats = []
  for example, grid in zip(examples, image_grids):
    question = chat_template.cot_question(example["problem"])
    prompt = chat_template.encode_chat(tokenizer, chat_template.vqa_messages(question), grid,
                                       add_generation_prompt=True)
    prefix_ids = np.asarray(tokenizer.encode(caption_prefix(example)), np.int32)
    full = chat_template.encode_chat(tokenizer, chat_template.vqa_messages(question, answer=example["cot"]), grid)
    if not np.array_equal(full.input_ids[len(prompt):len(prompt) + len(prefix_ids)], prefix_ids):
      raise ValueError(f"example {example.get('id')}: the description does not tokenise as in the training target")
    ids = np.concatenate([prompt.input_ids, prefix_ids])
    chats.append(chat_template.EncodedChat(ids, np.zeros(len(ids), bool), prompt.num_vision_tokens))
  return chats


def main(workdir, data_dir, out, n=1000):
  config = sft_config.get_config("tiny")
  with config.unlocked():
    config.train.workdir, config.data.data_dir = workdir, data_dir
  run = loops.Run(config, "eval")
  tokenizer, model = run.tokenizer, run.model()
  examples = setup.load_split(config, "test")[:n]
  params = setup.sampling_params(config, tokenizer, greedy=True)
  image_config = setup.image_config(config, model.config.vision)
  continued = evaluate.answer(model, tokenizer, examples, params, image_config, batch_size=BATCH,
                              prompt_buckets=PROMPT_BUCKETS, patch_buckets=tuple(config.data.patch_buckets),
                              encode_prompts=described_prompts)
  completions = [caption_prefix(e) + ("" if t.startswith(" ") else " ") + t for e, t in zip(examples, continued)]
  own = evaluate.answer(model, tokenizer, examples, params, image_config, batch_size=BATCH,
                        prompt_buckets=tuple(config.data.prompt_buckets), patch_buckets=tuple(config.data.patch_buckets))
  solutions, types = [e["solution"] for e in examples], [e["answer_type"] for e in examples]
  given, plain = metrics.summarize(completions, solutions, types), metrics.summarize(own, solutions, types)
  result = {"checkpoint": workdir, "step": run.step, "examples": len(examples),
            "accuracy_given_reference_description": given["accuracy"],
            "accuracy_own_description": plain["accuracy"],
            "by_answer_type": {t: {"given_reference": v["accuracy"], "own": plain["by_answer_type"][t]["accuracy"]}
                               for t, v in given["by_answer_type"].items()},
            "yes_no_yes_ratio": {"given_reference": given["yes_no"]["yes_ratio"], "own": plain["yes_no"]["yes_ratio"]},
            "samples": [{"problem": e["problem"], "completion": c} for e, c in zip(examples[:8], completions)]}
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:5]))
