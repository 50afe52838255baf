"""Scoring a model on a list of examples, as train.py does on val during training and on test at the end.

    predict   greedy captions; for questions the most likely option and the option the
              greedy next token after " The answer is" names (MemVP's eval.py)
    evaluate  the numbers: BLEU-4 and CIDEr-D (coco), accuracy by ScienceQA's categories
              (scienceqa, shapes), accuracy per question type (shapes)
    report    those numbers as one line, and as ScienceQA's table

`batch_of(examples, make)` is train.py's: a batch made by collate or choice_batch,
on the model's device, with cached ViT features when there are any. Both run
sharded over torchrun's processes (rank, world) and gather the predictions.
"""
import torch
import torch.distributed as dist
from tqdm import tqdm

from data import coco, scienceqa, shapes
from data.batch import choice_batch, choice_scores, collate, next_tokens, scored_logits
from data.metrics import caption_scores
from data.tokenizer import EOT, get_encoding


@torch.no_grad()
def predict(model, examples, args, batch_of, rank=0, world=1):
    """{id: greedy caption} for captions; for QA {id: (the option of highest likelihood, the option
    the greedy next token after " The answer is" names, or -1)}; sharded over processes."""
    model.eval()
    mine, out, enc = examples[rank::world], {}, get_encoding()
    for i in tqdm(range(0, len(mine), args.batch_size), desc="eval", leave=False, disable=rank != 0):
        chunk = mine[i:i + args.batch_size]
        captions, chunk = [ex for ex in chunk if ex.choices is None], [ex for ex in chunk if ex.choices]
        if captions:
            batch = batch_of(captions, collate)
            prompt = batch["idx"][:, :int(batch["prompt_mask"][0].sum())]  # every prompt is "A picture of"
            tokens = model.generate(batch["images"], prompt, 24, has_image=batch["has_image"],
                                    features=batch["features"])
            for ex, row in zip(captions, tokens[:, prompt.size(1):].tolist()):
                out[ex.id] = get_encoding().decode(row[:row.index(EOT)] if EOT in row else row).strip()
        if chunk:
            batch = batch_of(chunk, choice_batch)
            logits = scored_logits(model, batch)  # (N, V)
            likely = choice_scores(logits, batch).argmax(dim=-1).tolist()
            said = [scienceqa.parse_letter(enc.decode([t]), n)
                    for t, n in zip(next_tokens(logits, batch).tolist(), batch["n_choices"])]
            out.update({ex.id: (i, j) for ex, i, j in zip(chunk, likely, said)})
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, out)
        out = {k: v for part in parts for k, v in part.items()}
    model.train()
    return out


def evaluate(model, examples, args, batch_of, rank=0, world=1):
    """Captions: BLEU-4 and CIDEr-D of greedy captions. QA: accuracy by ScienceQA's categories of the
    most likely option; with --answer letter, also of the published protocol (MemVP's eval.py: the
    letter the greedy next token names, invalid = wrong), which is then the metric, the likelihood
    table under "likelihood". Shapes has both, and adds accuracy per question type and how often a
    caption names an object right."""
    out = predict(model, examples, args, batch_of, rank, world)
    if args.dataset == "coco":
        scores = caption_scores(coco.references(examples), out)
        return {"BLEU-4": scores["BLEU-4"], "CIDEr": scores["CIDEr"], "metric": scores["CIDEr"]}
    questions, captions = [ex for ex in examples if ex.choices], [ex for ex in examples if ex.choices is None]

    def table(picks):
        scores = scienceqa.score(questions, picks)
        return {**scores, **shapes.type_scores(questions, picks)} if args.dataset == "shapes" else scores
    scores = likelihood = table({ex.id: out[ex.id][0] for ex in questions})
    if args.answer == "letter":
        said = {ex.id: out[ex.id][1] for ex in questions}
        invalid = 100.0 * sum(v < 0 for v in said.values()) / len(said)
        scores = {**table(said), "invalid": invalid, "likelihood": likelihood}
    if args.dataset == "shapes" and captions:
        scene = {ex.id: ex.meta["scene"] for ex in questions if ex.meta["scene"]}
        named = [shapes.names_an_object(out[ex.id], scene[ex.meta["pid"]]) for ex in captions]
        scores["caption"] = 100.0 * sum(named) / len(named)
    return {**scores, "metric": scores["Avg"]}


def summary(scores):
    """One line of an evaluation's numbers (the likelihood table by its Avg)."""
    flat = {k: v for k, v in scores.items() if isinstance(v, float) and k != "metric"}
    if "likelihood" in scores:
        flat["Avg(likelihood)"] = scores["likelihood"]["Avg"]
    return " ".join(f"{k} {v:.2f}" for k, v in flat.items())


def report(scores, title):
    """Print the numbers under a title: one line, then for questions ScienceQA's table (both protocols
    where there are two)."""
    print(f"\n{title}: {summary(scores)}")
    if "Avg" in scores:
        rows = {"published": scores, "likelihood": scores["likelihood"]} if "likelihood" in scores else \
            {"likelihood": scores}
        print(scienceqa.format_scores(rows))


def show_sample(model, examples, args, batch_of):
    """Answer one example (the first with an image) and print it with the right answer."""
    ex = next((e for e in examples if e.image), examples[0])
    answer = predict(model, [ex], args, batch_of)[ex.id]
    print(f"\nimage: {ex.image}\n{ex.prompt}")
    if ex.choices is None:
        print(f"-> {answer}\n(a reference: {ex.references[0]})")
    else:
        print(f"->{ex.answer_prefix}{ex.choices[answer[0]]}. (most likely; right answer:{ex.choices[ex.answer]})")
