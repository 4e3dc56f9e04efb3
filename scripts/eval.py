"""Run lm-evaluation-harness tasks on our engine: log-likelihoods, rolling perplexity and generation.

    pip install -r requirements-eval.txt
    python scripts/eval.py --checkpoint checkpoints/SmolLM2-135M-Instruct --tasks hellaswag,arc_easy --batch-size 8
    python scripts/eval.py --checkpoint DIR --tasks my_task --include-path my_tasks/ --output results.json

The harness asks a model three kinds of question, and FastgenLM answers each with our model:
- loglikelihood (multiple choice): context + continuation scored in left-padded batches through
  the static KV cache, a chunk of positions at a time, logits kept only where they are scored;
- loglikelihood_rolling (perplexity): the text cut into the harness's windows of --max-length
  tokens (every token scored once, each window with as much context as fits), batched alike;
- generate_until: generate.Generator's batched decoding, rows of different lengths in one batch,
  each with its own stop strings (tokenizer.StopStrings) and token budget.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint import load_model  # noqa: E402
from common import write_json_atomic  # noqa: E402
from errors import FastgenError  # noqa: E402
from generate import KV_CACHE_DTYPES, Generator, Sampling, UsageError, resolve_checkpoint, resolve_device, resolve_dtype  # noqa: E402
from model import BLOCK_SIZE  # noqa: E402
from tokenizer import StopStrings, StreamDecoder, check_vocab, load_tokenizer  # noqa: E402

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # lm-eval is optional: main() says how to install it
    TemplateLM = None

INSTALL_HINT = "pip install -r requirements-eval.txt"
# Positions scored per forward call: logits are [batch, positions, vocab] fp32, so this bounds
# their memory (8 x 512 x 128k vocab = 2 GB) whatever the window length.
SCORE_CHUNK = 512


def cache_slots(n: int) -> int:
    """Cache length for a batch needing n slots: BLOCK_SIZE times a power of two, so a run sees
    few distinct cache shapes (few reallocations, CUDA-graph recordings and recompiles) and
    attention never spans more than twice the slots it needs."""
    blocks = max(1, math.ceil(n / BLOCK_SIZE))
    return BLOCK_SIZE * 2 ** math.ceil(math.log2(blocks))


class FastgenLM(TemplateLM or object):
    """lm-eval's model interface over our checkpoint, tokenizer and Generator."""

    def __init__(
        self,
        checkpoint,
        device="cpu",
        dtype=torch.float32,
        kv_cache_dtype=None,
        compile=False,
        batch_size: int = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
    ):
        super().__init__()
        self.model, self.config = load_model(checkpoint, device, dtype)
        self.tokenizer = load_tokenizer(checkpoint)
        check_vocab(self.tokenizer, self.model.args.vocab_size, checkpoint)
        self.checkpoint = Path(checkpoint)
        self.kv_cache_dtype = kv_cache_dtype
        self.batch_size = batch_size
        self.max_length = max_length or self.model.args.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        # --compile compiles the decode step, as generate.py's does. Scoring stays eager: its
        # shapes change from batch to batch, and its large matmuls gain little from a compiler.
        self.generator = Generator(self.model, compile=compile)
        self._device = self.generator.device

    # ---- what TemplateLM needs

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self):
        # What an empty context and the first rolling window condition on: bos when the
        # tokenizer has one, else eos (the convention of lm-eval's Hugging Face backend).
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # None: whatever the tokenizer does for a plain prompt (generate.py's encoding)
        bos = self.tokenizer.add_bos if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, bos=bos and self.tokenizer.bos_id is not None)

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def get_model_info(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "quantization": self.config.get("quantization"),
            "kv_cache_dtype": str(self.kv_cache_dtype).removeprefix("torch.") if self.kv_cache_dtype else None,
        }

    # ---- scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation), context ids, continuation ids) -> (logprob, is_greedy)."""
        items = []
        for _, context_ids, continuation_ids in requests:
            # keep the last max_length inputs (+1: the final token is only a target)
            seq = (context_ids + continuation_ids)[-(self.max_length + 1) :]
            items.append((seq, min(len(continuation_ids), len(seq) - 1)))
        return self._score(items, "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        windows, owner = [], []  # (ids, number of final ids scored); the request each came from
        for i, req in enumerate(requests):
            (text,) = req.args
            pairs = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            for context_ids, predicted_ids in map(make_disjoint_window, pairs):
                windows.append((context_ids + predicted_ids, len(predicted_ids)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows, "loglikelihood_rolling", disable_tqdm)):
            totals[i] += logprob
        return totals

    def _score(self, items, what, disable_tqdm):
        """items: (ids, n): the log-probability of the last n ids given the ids before them, and
        whether greedy decoding would produce them. Longest first, so batches pad little."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        results = [None] * len(items)
        with tqdm(total=len(items), desc=f"fastgen {what}", disable=disable_tqdm) as bar:
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                for i, result in zip(rows, self._score_batch([items[i] for i in rows])):
                    results[i] = result
                bar.update(len(rows))
        return results

    @torch.no_grad()
    def _score_batch(self, batch):
        model, device = self.model, self._device
        inputs = [ids[:-1] for ids, _ in batch]
        T, B = max(len(x) for x in inputs), len(batch)
        self.generator.setup(B, cache_slots(T), self.kv_cache_dtype)
        model.set_row_starts(torch.tensor([T - len(x) for x in inputs], dtype=torch.int32, device=device))
        tokens = torch.tensor([[0] * (T - len(x)) + x for x in inputs], device=device)
        targets = torch.tensor([[0] * (T - len(x)) + ids[1:] for x, (ids, _) in zip(inputs, batch)], device=device)
        first_scored = T - max(n for _, n in batch)  # rows are right-aligned: scored ids sit at the end
        logprob = torch.zeros(B, T, device=device)
        greedy = torch.ones(B, T, dtype=torch.bool, device=device)
        input_pos = torch.arange(T, device=device)
        for c0 in range(0, T, SCORE_CHUNK):  # each chunk writes its K/V; the next one attends to them
            c1 = min(c0 + SCORE_CHUNK, T)
            kept = c1 - max(c0, first_scored)
            logits = model(tokens[:, c0:c1], input_pos[c0:c1], logits_to_keep=max(kept, 1))
            if kept > 0:
                logits, target = logits[:, -kept:], targets[:, c1 - kept : c1]
                logprob[:, c1 - kept : c1] = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0]
                greedy[:, c1 - kept : c1] = logits.argmax(-1) == target
        return [(logprob[b, T - n :].sum().item(), bool(greedy[b, T - n :].all())) for b, (_, n) in enumerate(batch)]

    # ---- generation

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Rows that sample alike share batches; within a batch each row keeps its own stop
        strings and token budget, and ends on its own."""
        jobs = []  # (request index, prompt ids, stop strings, max new tokens, Sampling)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            stops, budget, sampling = self._generation_settings(gen_kwargs)
            if budget >= self.max_length:
                raise UsageError(f"a task asks for {budget} new tokens but --max-length is {self.max_length}")
            prompt = self.tok_encode(context)[-(self.max_length - budget) :]  # keep room for the reply
            jobs.append((i, prompt, stops, budget, sampling))
        jobs.sort(key=lambda job: (str(job[4]), -len(job[1])))
        results = [None] * len(jobs)
        with tqdm(total=len(jobs), desc="fastgen generate_until", disable=disable_tqdm) as bar:
            start = 0
            while start < len(jobs):
                batch = [jobs[start]]
                while (
                    start + len(batch) < len(jobs)
                    and len(batch) < self.batch_size
                    and jobs[start + len(batch)][4] == batch[0][4]
                ):
                    batch.append(jobs[start + len(batch)])
                for job, text in zip(batch, self._generate_batch(batch)):
                    results[job[0]] = text
                start += len(batch)
                bar.update(len(batch))
        return results

    def _generation_settings(self, gen_kwargs: dict):
        """lm-eval's generation kwargs -> (stop strings, max new tokens, Sampling)."""
        until = gen_kwargs.get("until") or []
        stops = [s for s in ([until] if isinstance(until, str) else until) if s]  # lm-eval ignores "" too
        budget = next(
            (
                int(gen_kwargs[k])
                for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                if gen_kwargs.get(k) is not None
            ),
            self.max_gen_toks,
        )
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if gen_kwargs.get("do_sample") and temperature == 0:
            temperature = 1.0  # sampling asked for without a temperature: Hugging Face's default
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        if temperature == 0:
            return stops, budget, Sampling()
        return stops, budget, Sampling(temperature, gen_kwargs.get("top_k"), gen_kwargs.get("top_p"))

    def _generate_batch(self, batch):
        prompts = [prompt for _, prompt, _, _, _ in batch]
        budgets = [budget for _, _, _, budget, _ in batch]
        decoders = [StreamDecoder(self.tokenizer) for _ in batch]
        cutters = [StopStrings(stops) for _, _, stops, _, _ in batch]
        counts = [0] * len(batch)

        def on_token(row, token_id):
            counts[row] += 1
            cutters[row].push(decoders[row].push(token_id))
            return cutters[row].fired is not None or counts[row] >= budgets[row]  # True ends the row

        self.generator.setup(len(batch), cache_slots(max(map(len, prompts)) + max(budgets)), self.kv_cache_dtype)
        self.generator.generate(prompts, max(budgets), batch[0][4], self.tokenizer.stop_ids, on_token)
        for cutter, decoder in zip(cutters, decoders):
            cutter.push(decoder.flush())
            cutter.flush()
        return [cutter.text for cutter in cutters]


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint directory (default: checkpoints/SmolLM2-135M-Instruct)",
    )
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task, group or tag names (globs allowed)")
    p.add_argument("--include-path", type=Path, default=None, help="a folder of extra task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1); for testing")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens of context per request and rolling window (default: the model's context)",
    )
    p.add_argument("--max-gen-toks", type=int, default=256, help="new tokens when a task does not say")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--kv-cache-dtype", default=None, help="bf16, fp16, fp32, int8 or fp8 (default: the compute dtype)")
    p.add_argument("--compile", action="store_true", help="compile the decode step of generation (CUDA graph on GPU)")
    p.add_argument("--seed", type=int, default=1234, help="python, numpy, torch and few-shot seeds")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="for the harness's stderr estimates (0: none)")
    p.add_argument("--output", type=Path, default=None, help="write the harness's results JSON here (atomically)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def task_manager_for(names, include_path):
    """A TaskManager that knows every name asked for; an unknown name is a UsageError.
    Indexing lm-eval's own few thousand tasks takes seconds, so when --include-path alone
    holds every task asked for, only it is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not include_path.is_dir():
            raise UsageError(f"--include-path {include_path} is not a folder")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([name]) for name in names):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [name for name in names if not manager.match_tasks([name])]
    if unknown:
        raise UsageError(
            f"unknown task {unknown[0]!r}; `lm-eval ls tasks` lists lm-eval's tasks, and "
            f"--include-path adds a folder of your own task YAML files"
        )
    return manager


def load_tasks(manager, names):
    """Load each task (downloading its dataset if needed) before the model, so a task that
    cannot be had fails fast. Returns what simple_evaluate takes: groups stay groups."""
    items = []
    for name in names:
        for match in manager.match_tasks([name]):
            try:
                loaded = manager.load([match])
            except ConnectionError as e:  # datasets: the hub is unreachable or HF_HUB_OFFLINE is set
                raise UsageError(
                    f"task {match!r} needs its dataset from the Hugging Face hub, which is offline "
                    f"here ({e}); run it where the hub is reachable, or use a local task "
                    f"(--include-path)"
                ) from None
            group = loaded["groups"].get(match)
            items += [group] if group is not None else list(loaded["tasks"].values())
    return items


def validate(args):
    for flag, value, least in (
        ("--batch-size", args.batch_size, 1),
        ("--max-gen-toks", args.max_gen_toks, 1),
        ("--max-length", args.max_length, 2),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least} (got {value})")
    if args.limit is not None and args.limit <= 0:
        raise UsageError(f"--limit must be positive (got {args.limit})")


def run(args):
    if TemplateLM is None:
        raise UsageError(f"lm-eval is not installed; run: {INSTALL_HINT}")
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    validate(args)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not names:
        raise UsageError("--tasks names no task")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, "--dtype", torch.bfloat16 if device.type == "cuda" else torch.float32)
    kv_cache_dtype = resolve_dtype(args.kv_cache_dtype, "--kv-cache-dtype", None, KV_CACHE_DTYPES)
    checkpoint = resolve_checkpoint(args.checkpoint)

    tasks = load_tasks(task_manager_for(names, args.include_path), names)
    t0 = time.perf_counter()
    lm = FastgenLM(
        checkpoint, device, dtype, kv_cache_dtype, args.compile, args.batch_size, args.max_length, args.max_gen_toks
    )
    if (
        args.compile
        and device.type == "cpu"
        and (lm.config.get("quantization") or {}).get("mode") == "int4"
        and dtype != torch.bfloat16
    ):
        raise UsageError("--compile on the CPU with an int4 checkpoint needs --dtype bf16")
    if args.max_length is not None and args.max_length > lm.model.args.max_position_embeddings:
        raise UsageError(
            f"--max-length {args.max_length} exceeds the model's context of "
            f"{lm.model.args.max_position_embeddings} tokens"
        )
    print(
        f"Loaded {checkpoint} in {time.perf_counter() - t0:.2f} s ({device}, {str(dtype).removeprefix('torch.')})",
        file=sys.stderr,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        log_samples=False,
        bootstrap_iters=args.bootstrap_iters,
        random_seed=args.seed,
        numpy_random_seed=args.seed,
        torch_random_seed=args.seed,
        fewshot_random_seed=args.seed,
    )
    results["config"]["model"] = "fastgen"
    results["config"]["batch_size"] = args.batch_size
    results["config"]["device"] = str(device)
    results["config"]["dtype"] = str(dtype).removeprefix("torch.")
    results["config"]["compile"] = args.compile
    print(make_table(results))
    if args.output is not None:
        write_json_atomic(args.output, results, default=handle_non_serializable, ensure_ascii=False)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (FastgenError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
