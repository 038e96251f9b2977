"""Builds the CLIP parity fixtures under tests/fixtures/clip/ (pinned; rerun to reproduce).

1. tokenizer/: a small CLIP-format BPE vocabulary (vocab.json + merges.txt laid out like
   openai/clip-vit-large-patch14's: the 256 byte symbols, their `</w>` forms, one token per merge,
   then <|startoftext|> and <|endoftext|>), with merges learned from the built-in corpus below, plus
   SD v1.4's tokenizer_config.json / special_tokens_map.json (pad = <|endoftext|>, max length 77).
2. tokenizer_expected.json: the ids transformers' CLIPTokenizer gives for tricky prompts, padded and
   truncated to 77 as diffusers' SD pipeline asks, for that folder and two config variants (SD 2's
   pad "!", and no config files at all); plus the decoded text for the first.
3. Two tiny random CLIPTextModels (quick_gelu and gelu): config.json, weights under the
   `text_model.` names of SD checkpoints (with the legacy `position_ids` buffer that older
   checkpoints carry), input ids, and reference outputs computed in float64.

On the reference: transformers 5 has only the `tokenizers`-backed CLIPTokenizer (what we match).
The legacy slow python CLIPTokenizer of transformers 4.57.1, checked once on these prompts, differs
from it on 4 of 22 both with and without ftfy. With ftfy, `fix_text` uncurls quotes, unescapes HTML
entities and folds fullwidth characters / ligatures; without ftfy, its BasicTokenizer fallback
splits CJK text into single characters and drops zero-width/format characters (U+200B, U+200D).
In both modes it also turns an upper-case "<|ENDOFTEXT|>" typed in a prompt into eos.

Usage: source tools/setup.sh && python tools/make_clip_fixtures.py
"""

import json
import os
import shutil
import tempfile
import unicodedata
from collections import Counter

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Regex, normalizers, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "clip")
TOKENIZER_DIR = os.path.join(ROOT, "tokenizer")
MAX_LENGTH = 77
MAX_MERGES = 700  # an upper bound: on this corpus, pairs fall below MIN_PAIR_COUNT earlier
MIN_PAIR_COUNT = 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# transformers' CLIPTokenizer pre-tokenizer pattern (same as OpenAI's simple_tokenizer).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

CORPUS = """
a photo of an astronaut riding a horse on the moon, highly detailed, digital art
portrait of a young woman with long red hair, oil painting, by rembrandt, dramatic lighting
a cute corgi dog sitting in a field of sunflowers, golden hour, bokeh, 85mm lens
a futuristic city skyline at night with neon lights and flying cars, cyberpunk, rain
a bowl of ramen with eggs and green onions, food photography, studio lighting
an old wooden cabin in a snowy forest, winter landscape, smoke rising from the chimney
a watercolor painting of a lighthouse on a rocky coast during a storm, waves crashing
a close up photograph of a cat with blue eyes, sharp focus, trending on artstation
the interior of a cozy library with tall bookshelves, warm light, a fireplace and leather chairs
a red sports car driving along a mountain road, motion blur, cinematic, wide angle
a medieval castle on a hill surrounded by clouds, fantasy concept art, matte painting
a bouquet of roses and tulips in a glass vase on a kitchen table, still life, soft light
an astronaut floating in space above the earth, stars in the background, photorealistic
a robot playing the piano in an empty concert hall, spotlight, dramatic shadows
a sailing boat on a calm lake at sunrise, reflections in the water, mist over the mountains
a street market in a busy town with people selling fruit and vegetables, colorful, documentary photo
a black and white photograph of a jazz musician playing the saxophone in a smoky club
a dragon flying over a burning village, epic fantasy illustration, highly detailed scales
a minimalist living room with white walls, a grey sofa and large windows, architectural photography
a child reading a book under a tree in the park, summer afternoon, soft focus
a herd of elephants walking across the savanna at sunset, wildlife photography, telephoto
an ancient temple covered in vines in the middle of the jungle, light rays through the trees
a plate of pancakes with blueberries and maple syrup, breakfast, top down view
a snowy mountain peak above a sea of clouds, landscape photography, sharp and detailed
a portrait of an old man with a white beard and a hat, charcoal drawing, expressive lines
the painting of a starry night over a small village, swirling sky, in the style of van gogh
a cup of coffee on a wooden desk next to a laptop and a notebook, morning light
a fox sleeping in the snow, its tail curled around its body, nature photography
an underwater scene with colorful coral reefs and tropical fish, clear blue water
a steam train crossing a stone bridge over a river valley, autumn colors, vintage photo
it's a dog's life; don't you think they're happy? we've seen it, i'm sure you'll like it, i'd say
the quick brown fox jumps over the lazy dog while the other dogs are sleeping
masterpiece, best quality, ultra detailed, 4k, 8k, hdr, professional photography, award winning
painting by greg rutkowski and alphonse mucha, concept art, smooth, sharp focus, illustration
a beautiful garden with flowers, trees, birds and butterflies, spring, bright colors
a photo of a sks dog wearing a red hat, sitting on the beach, high resolution
café crème brûlée, a résumé on the table, naïve art, café terrace at night, crème de la crème
a street in 東京 at night, 東京 tower, 日本 garden, a cute 猫 sleeping, 猫 and 犬
a smiling cat 🐱 with pink flowers 🌸, love ❤️, a cat 🐱 among cherry blossoms 🌸 ❤️
"""


def bytes_to_unicode():
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters, in
    the order CLIP's vocab.json lists them (printable ranges first, then the rest shifted to 256+)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
    for b in range(256):
        if b not in printable:
            table[b] = chr(256 + shift)
            shift += 1
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def merge_pair(word, pair):
    """`word` (a tuple of symbols) with every non-overlapping occurrence of `pair` fused."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def learn_merges():
    """Learns CLIP-style BPE merges over the corpus, pre-tokenized by CLIP's own normalizer and
    pre-tokenizer (words end in `</w>`). Written out rather than using tokenizers' BpeTrainer,
    whose order among equally frequent pairs changes from run to run: here ties go to the
    lexicographically smallest pair, so the fixture is reproducible."""
    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words = Counter()
    for line in CORPUS.splitlines():
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
    merges = []
    while len(merges) < MAX_MERGES:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < MIN_PAIR_COUNT:
            break
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            merged[merge_pair(word, best)] += count
        words = merged
    return merges


def write_tokenizer():
    os.makedirs(TOKENIZER_DIR, exist_ok=True)
    alphabet = bytes_to_unicode()
    merges = learn_merges()
    tokens = alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "merge results must be unique tokens"
    with open(os.path.join(TOKENIZER_DIR, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(TOKENIZER_DIR, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    # As in CompVis/stable-diffusion-v1-4's tokenizer/ folder.
    config = {
        "add_prefix_space": False,
        "bos_token": added(BOS),
        "do_lower_case": True,
        "eos_token": added(EOS),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added(EOS),
    }
    special = {
        "bos_token": {k: v for k, v in added(BOS).items() if k != "__type"},
        "eos_token": {k: v for k, v in added(EOS).items() if k != "__type"},
        "pad_token": EOS,
        "unk_token": {k: v for k, v in added(EOS).items() if k != "__type"},
    }
    for name, value in [("tokenizer_config.json", config), ("special_tokens_map.json", special)]:
        with open(os.path.join(TOKENIZER_DIR, name), "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
            f.write("\n")
    return len(vocab), len(merges)


def tricky_prompts():
    long_words = " ".join(f"word{i} and more text, number {i * 7}" for i in range(40))
    return [
        "a photo of an astronaut riding a horse on mars",
        "A Photo Of A CAT, Highly Detailed, 8K, Trending On ArtStation!!!",
        "portrait of sks dog, (masterpiece:1.2), [blurry], {best quality}, <lora:x:0.5>",
        "1234567890 3.14159 2024-01-31 #42 $100 50% 1,000,000 v2.1",
        "it's a dog's life, don't you think? we're sure they'll like it, I'd say I'm sure you've",
        "IT'S DON'T WE'LL THEY'RE",
        "café crème brûlée à la française, naïve façade, Ångström, Straße, İstanbul",
        unicodedata.normalize("NFD", "cafe\u0301 decomposed: résumé, piñata"),
        "一只可爱的猫 in 東京 at night, 日本語のテキスト, 고양이 사진",
        "ΑΘΗΝΑ and Москва and Ελληνικά, mixed scripts",
        "a cute 🐱 with 🌸 flowers, 👩‍🚀 astronaut, flags 🇯🇵 and ❤️ hearts 👍🏽",
        "  lots   of\tspaces\nand\r\nnewlines \u00a0nbsp\u2003em-space\u200bzero-width  ",
        "\u201cquoted\u201d and \u2018single\u2019 and it\u2019s curly \u2014 em dash \u2026 ellipsis",
        "html entities &amp; &lt;tag&gt; &quot;x&quot; stay literal",
        "<|startoftext|>a prompt that contains<|endoftext|> the special tokens",
        "<|STARTOFTEXT|>upper-case<|ENDOFTEXT|> special tokens, and!bang!",
        "",
        "ＡＢＣ１２３ fullwidth ﬁ ligature, E=mc², ½ cup, 10×10, ™ ©, x^2 + y_1",
        "hello...world?!;:--==>> ((((nested)))) ~~~ @user #tag",
        "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis",
        "a" * 200,
        long_words,
    ]


def sd2_config_files():
    """stabilityai/stable-diffusion-2's tokenizer pads with "!" (which thereby becomes a special token)."""
    files = {}
    for name in ["tokenizer_config.json", "special_tokens_map.json"]:
        with open(os.path.join(TOKENIZER_DIR, name), encoding="utf-8") as f:
            files[name] = json.load(f)
        files[name]["pad_token"] = "!"
    return files


def encode_variant(name, files, prompts):
    """Ids from transformers' CLIPTokenizer for a tokenizer folder made of our vocab/merges plus
    `files` (None: the committed SD v1.4-style folder), called exactly as diffusers' SD pipeline does."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = TOKENIZER_DIR
        if files is not None:
            folder = tmp
            for vocab_file in ["vocab.json", "merges.txt"]:
                shutil.copy(os.path.join(TOKENIZER_DIR, vocab_file), tmp)
            for file_name, content in files.items():
                with open(os.path.join(tmp, file_name), "w", encoding="utf-8") as f:
                    json.dump(content, f)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
        ids = tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True)["input_ids"]
    assert all(len(row) == MAX_LENGTH for row in ids)
    variant = {"name": name, "files": files, "prompts": prompts, "input_ids": ids}
    return tokenizer, variant


def write_tokenizer_expectations():
    prompts = tricky_prompts()
    tokenizer, sd1 = encode_variant("sd1", None, prompts)
    assert tokenizer.model_max_length == MAX_LENGTH and tokenizer.pad_token == EOS
    sd1["decoded"] = tokenizer.batch_decode(sd1["input_ids"], skip_special_tokens=True)
    short = [p for p in prompts if "!" in p or len(p) < 60]
    _, sd2 = encode_variant("sd2_pad_bang", sd2_config_files(), short)
    _, bare = encode_variant("vocab_and_merges_only", {}, short)
    expected = {"transformers_version": transformers.__version__, "variants": [sd1, sd2, bare]}
    with open(os.path.join(ROOT, "tokenizer_expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=1)
        f.write("\n")
    return tokenizer, sd1["input_ids"]


def write_model(name, hidden_act, vocab_size, tokenizer, input_ids, seed):
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    # transformers initialises biases to zero and layer norms to identity; perturb every parameter so
    # a wrongly-wired bias or norm cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    out_dir = os.path.join(ROOT, name)
    os.makedirs(out_dir, exist_ok=True)
    config.to_json_file(os.path.join(out_dir, "config.json"))

    # SD checkpoints name everything under `text_model.`; older ones also carry the position_ids buffer.
    weights = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    weights["text_model.embeddings.position_ids"] = torch.arange(MAX_LENGTH).unsqueeze(0)
    save_file(weights, os.path.join(out_dir, "model.safetensors"))

    reference = model.double()
    ids = torch.tensor(input_ids, dtype=torch.long)
    with torch.no_grad():
        out = reference(input_ids=ids, output_hidden_states=True)
    penultimate = out.hidden_states[-2]
    tensors = {
        "input_ids": ids,
        "last_hidden_state": out.last_hidden_state.float(),
        # hidden_states[-2]: the raw output of the second-to-last layer.
        "penultimate_hidden_state": penultimate.float(),
        # diffusers' clip_skip=1: final_layer_norm applied to hidden_states[-2].
        "clip_skip_1": reference.final_layer_norm(penultimate).float(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "expected.safetensors"))


def main():
    vocab_size, num_merges = write_tokenizer()
    tokenizer, ids = write_tokenizer_expectations()
    # A batch with padding, a CJK/emoji prompt and a truncated one.
    batch = [ids[0], ids[8], ids[10], ids[-1]]
    write_model("text_quick_gelu", "quick_gelu", vocab_size, tokenizer, batch, seed=0)
    write_model("text_gelu", "gelu", vocab_size, tokenizer, batch[:2], seed=1)
    print(f"vocab {vocab_size} tokens ({num_merges} merges); fixtures in {os.path.normpath(ROOT)}")


if __name__ == "__main__":
    main()
