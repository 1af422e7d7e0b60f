"""The default training corpus: fiction, textbook-style passages and how-to text written by the base model itself.

Like the synthetic Cosmopedia data the paper trained on (textbooks, stories), but generated
locally so `balcony train` runs offline out of the box. Half the prompts ask for textbook-style
passages, a quarter for fiction (scenes with characters and dialogue) and a quarter for everyday
how-to text (household tasks, tools, materials: PIQA's domain). Measured on exit 14 of SmolLM2-135M,
61k tokens of each kind, 390 steps of the default recipe, paired against plain early exit on all of
ARC-Easy (2376 items) and PIQA (1838): textbook passages gave ARC-Easy acc_norm -0.6 points, the
earlier half-fiction mix -1.7 and fiction alone -3.5, while how-to text lifted PIQA acc by +2.7
(textbook alone -0.7). Fiction still teaches LAMBADA's novels (40k tokens on exit 14: KL 2.02 vs
2.18, top-1 agreement 35.2% vs 33.9% against textbook text), so it keeps a quarter. Self-generated
text is also exactly the distribution the teacher is confident on.
Passages are sampled at temperature 1 without a top-p cut (`SAMPLING`): text that follows the
model's own distribution teaches the exits real text better than cooler samples (exit 17: LAMBADA
agreement 45.9% against 42.6% at temperature 0.8). Passages are appended to a JSONL file in the
cache as they are made, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import random
from pathlib import Path

import torch

from ..modeling.loading import cache_dir

TOPICS = [
    "photosynthesis", "the water cycle", "plate tectonics", "volcanoes", "the solar system", "black holes",
    "the human heart", "the immune system", "DNA and genes", "evolution by natural selection", "bacteria and viruses",
    "the periodic table", "chemical reactions", "acids and bases", "electricity and circuits", "magnetism",
    "Newton's laws of motion", "energy and work", "light and optics", "sound waves", "climate and weather",
    "the Roman Empire", "ancient Egypt", "the Renaissance", "the Industrial Revolution", "the French Revolution",
    "World War I", "the Cold War", "the printing press", "the Silk Road", "democracy in ancient Athens",
    "supply and demand", "inflation", "banks and interest", "international trade", "budgeting personal money",
    "fractions and decimals", "prime numbers", "the Pythagorean theorem", "probability", "statistics and averages",
    "algebraic equations", "geometry of circles", "computer programming basics", "how the internet works",
    "algorithms and sorting", "databases", "machine learning", "cybersecurity", "renewable energy", "recycling",
    "healthy eating", "sleep and the brain", "exercise and muscles", "first aid", "mental health", "nutrition labels",
    "writing a persuasive essay", "grammar and punctuation", "poetry and rhyme", "Shakespeare's plays",
    "world religions", "philosophy of ethics", "logic and arguments", "psychology of memory", "language learning",
    "music theory", "the history of jazz", "painting techniques", "architecture of cathedrals", "film making",
    "gardening", "cooking bread", "coffee and tea", "bees and pollination", "oceans and coral reefs", "rainforests",
    "deserts", "mountains and glaciers", "rivers and erosion", "maps and navigation", "time zones", "space exploration",
    "the Moon landing", "robots", "3D printing", "electric cars", "airplanes and flight", "bridges and engineering",
]
STYLES = [
    "a textbook section for high-school students",
    "a short lesson for middle-school students",
    "an explanatory blog post for curious adults",
    "a university lecture summary",
    "a step-by-step tutorial",
    "a story that teaches the idea to children",
    "a question-and-answer study guide",
    "a short story that involves",
    "a dialogue between two friends who talk about",
    "a newspaper article reporting on",
    "a diary entry by someone who learns about",
    "an encyclopedia article on",
    "a letter to a younger sibling explaining",
]
FICTION_TOPICS = [
    "a family dinner that goes wrong", "a detective investigating a stolen necklace", "two strangers on a night train",
    "a soldier coming home after the war", "a girl who finds a secret door in her grandmother's house", "a haunted farmhouse",
    "a couple arguing about moving to another city", "a wedding day", "a storm at sea", "a lost dog finding its way home",
    "a nervous job interview", "a murder in a small town", "a letter from an old friend", "a hospital waiting room at night",
    "a road trip between two brothers", "a vampire hiding in a big city", "a knight and a dragon", "a bank robbery",
    "a trial in a courtroom", "a first date", "a teenager running away from home", "a ghost who wants to be remembered",
    "a king's betrayal", "a woman starting over after a divorce", "a boy and his grandfather fishing", "a spaceship crew in trouble",
    "a witch who lost her powers", "a high school reunion", "a secret kept by two sisters", "an escape from prison",
    "a chef's first night at a new restaurant", "a mother waiting for news", "a rivalry between two musicians",
    "a kidnapping", "a snowed-in mountain cabin", "a farmer during a drought", "a thief with a conscience",
    "a pilot lost over the ocean", "an old man's last day at work", "a fight between best friends",
]
FICTION_STYLES = [
    "a chapter of a novel, with dialogue, about",
    "a scene from a novel, told in the third person, about",
    "a first-person story about",
    "a tense scene full of dialogue about",
    "a short story for adults about",
]
HOWTO_TOPICS = [
    "removing a stain from clothes", "fixing a flat bicycle tire", "keeping bread fresh", "cleaning a cast iron pan",
    "hanging a picture on a wall", "packing a suitcase", "unclogging a drain", "sharpening a kitchen knife",
    "building a campfire", "tying a tie", "painting a room", "planting tomatoes", "storing leftovers safely",
    "cleaning windows without streaks", "opening a stuck jar lid", "folding a fitted sheet", "making a paper airplane",
    "washing a wool sweater", "removing rust from tools", "peeling garlic quickly", "boiling eggs",
    "fixing a squeaky door", "cleaning a microwave", "wrapping a gift", "sewing a button", "cutting a mango",
    "getting gum out of hair", "keeping flowers fresh in a vase", "repairing a wobbly table", "drying wet shoes",
    "removing a splinter", "cooling a hot room without air conditioning", "organizing a closet", "cleaning a keyboard",
    "making a bird feeder", "loosening a tight screw", "polishing silverware", "descaling a kettle",
    "making cold brew coffee", "patching a hole in drywall", "keeping mosquitoes away",
    "melting chocolate without burning it", "lighting a charcoal grill", "cleaning a paint brush",
    "softening hard butter", "removing a sticker from glass", "filling a water balloon", "stacking firewood",
]
HOWTO_STYLES = [
    "step-by-step instructions for",
    "a practical guide to",
    "a list of household tips for",
    "a short answer to a friend who asks about",
    "a forum reply explaining the best way of",
]
# Shares of prompts that ask for fiction (FICTION_TOPICS x FICTION_STYLES) and for everyday how-to text
# (HOWTO_TOPICS x HOWTO_STYLES); the rest are textbook-style (TOPICS x STYLES).
FICTION_SHARE = 0.25
HOWTO_SHARE = 0.25
# Bump when the prompts change: the cached corpus is keyed on it (and on the sampling settings).
PROMPT_VERSION = 5
# How passages are sampled: plain sampling at temperature 1, so the text follows the model's own
# distribution, tails included (top-k 1000 holds nearly all of the mass and keeps batched sampling
# cheap). Measured on exit 17 of SmolLM2-135M (61k generated tokens, 13 epochs of the default recipe,
# scored on 12k LAMBADA tokens): temperature 0.8 with top-k 100 / top-p 0.95 gave KL 1.53 and top-1
# agreement 42.6%; temperature 1.0 with the same cut-offs 1.40 / 44.7%; temperature 1.0, top-k 1000,
# no top-p 1.29 / 45.9%. Text sampled closer to the model's distribution teaches the exits the
# contexts that real text gives them, where cooler samples are easier than any real text.
SAMPLING = {"temperature": 1.0, "top_k": 1000, "top_p": 1.0}


def _prompts(tok, n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.random()
        if FICTION_SHARE <= kind < FICTION_SHARE + HOWTO_SHARE:
            topic, style = rng.choice(HOWTO_TOPICS), rng.choice(HOWTO_STYLES)
            request = f"Write {style} {topic}. Be concrete and practical, and say which tools or materials to use."
        else:
            fiction = kind < FICTION_SHARE
            topic = rng.choice(FICTION_TOPICS if fiction else TOPICS)
            style = rng.choice(FICTION_STYLES if fiction else STYLES)
            tail = " " if style.endswith((" involves", " about", " on", " explaining")) else " about "
            request = f"Write {style}{tail}{topic}. Be concrete and accurate."
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True)
        else:
            text = f"{request}\n\n"
        out.append((topic, text))
    return out


def strip_repetition(text: str, max_repeats: int = 1) -> str:
    """Cut a passage where a small model starts looping: at the first line seen more than `max_repeats` times.

    Example:
        >>> strip_repetition("a\nb\nb\nc")
        'a\nb'
    """
    seen: dict[str, int] = {}
    kept = []
    for line in text.split("\n"):
        key = line.strip()
        if key:
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > max_repeats:
                break
        kept.append(line)
    return "\n".join(kept).strip()


def corpus_path(model, seed: int, *, temperature: float = SAMPLING["temperature"], top_k: int = SAMPLING["top_k"],
                top_p: float = SAMPLING["top_p"]) -> Path:
    """Where the generated corpus of `model` (with these sampling settings) lives in the cache."""
    key = f"{model.config.base_config_fingerprint}-{model.config.base_model_name_or_path}-{seed}-v{PROMPT_VERSION}"
    if (temperature, top_k, top_p) != (0.8, 100, 0.95):  # the settings of prompt version 4's first corpus keep its key
        key += f"-t{temperature:g}-k{top_k}-p{top_p:g}"
    return cache_dir() / "corpus" / f"generated-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"


def _count_tokens(path: Path) -> int:
    if not path.is_file():
        return 0
    return sum(json.loads(line)["tokens"] for line in path.read_text().splitlines() if line.strip())


@torch.no_grad()
def generated_corpus(
    model,
    tok,
    *,
    num_tokens: int = 200_000,
    batch_size: int = 128,
    max_new_tokens: int = 320,
    temperature: float = SAMPLING["temperature"],
    top_k: int = SAMPLING["top_k"],
    top_p: float = SAMPLING["top_p"],
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build (or extend) the self-generated corpus until it holds `num_tokens` tokens.

    Args:
        model: A BalconyModel (generation runs at its full budget: the base model).
        tok: Its tokenizer.
        num_tokens: Tokens of generated text wanted.
        batch_size: Prompts generated together.
        max_new_tokens: Length cap of one passage.
        temperature, top_k, top_p: Sampling settings (default `SAMPLING`: the model's own
            distribution; top-k also makes batched sampling cheap, see `balcony.inference.sampling.sample`).
            Each setting has its own cache file.
        seed: Seed of topics and sampling.
        progress: Show a progress bar.

    Returns:
        Path of the JSONL file (fields ``text``, ``topic``, ``tokens``).
    """
    path = corpus_path(model, seed, temperature=temperature, top_k=top_k, top_p=top_p)
    if _count_tokens(path) >= num_tokens:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two runs sharing a cache (a second terminal, a test beside a training run) must not both append the
    # same rounds: the second waits for the first, then extends what it wrote (or finds it long enough).
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _extend(path, model, tok, num_tokens, batch_size, max_new_tokens, temperature, top_k, top_p, seed, progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path


def _extend(path: Path, model, tok, num_tokens: int, batch_size: int, max_new_tokens: int, temperature: float, top_k: int,
            top_p: float, seed: int, progress: bool) -> None:
    """Generate rounds of passages into `path` until it holds `num_tokens` tokens (the caller holds the lock)."""
    have = _count_tokens(path)
    if have >= num_tokens:
        return
    done_lines = len(path.read_text().splitlines()) if path.is_file() else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_tokens, initial=have, desc="generating default corpus (cached once)", unit="tok", unit_scale=True)
    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    round_no = done_lines // batch_size
    while have < num_tokens:
        # The last round only makes what is still missing (a passage averages ~3/4 of max_new_tokens).
        wanted = math.ceil((num_tokens - have) / (0.6 * max_new_tokens))
        prompts = _prompts(tok, min(batch_size, max(wanted, 1)), seed * 7919 + round_no)
        enc = [tok(text, add_special_tokens=False).input_ids for _, text in prompts]
        width = max(map(len, enc))
        ids = torch.full((len(enc), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):  # left padding
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        # On the model's device: sampling draws there (a CPU generator cannot drive CUDA sampling).
        gen = torch.Generator(device=device).manual_seed(seed * 104729 + round_no)
        out = model.generate(ids.to(device), mask.to(device), exit=None, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tok.eos_token_id, generator=gen)
        with open(path, "a") as f:
            for (topic, _), row in zip(prompts, out[:, width:].tolist()):
                if tok.eos_token_id in row:
                    row = row[: row.index(tok.eos_token_id)]
                text = strip_repetition(tok.decode(row, skip_special_tokens=True).strip())
                n_tok = len(tok(text, add_special_tokens=False).input_ids)
                if n_tok < 16:
                    continue
                f.write(json.dumps({"text": text, "topic": topic, "tokens": n_tok}) + "\n")
                have += n_tok
                if bar is not None:
                    bar.update(n_tok)
        round_no += 1
    if bar is not None:
        bar.close()
