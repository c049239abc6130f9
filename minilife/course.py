"""Coursework generated from the library and graded by its own tests.

What it implements
- A registry of exercises (``EXERCISES``): per id, the chapter, the points, the module, a one-line
  "what to implement", "what to read" (the paper/equation and the docstring), and the grading tests:
  pytest node ids of the EXISTING reference-math and property tests under tests/ that check that
  function (the same tests that check minilife itself): those that fail when the region is replaced
  by NotImplementedError (and pass with the reference solution).
- Solution regions in library functions, marked by a comment pair the registry finds::

      # exercise: <id>
      ...the reference solution...
      # end exercise: <id>

- ``make <chapter> --out DIR``: a self-contained student workspace: a copy of minilife/ in which each
  region of the chapter is replaced by ``raise NotImplementedError("<id>: implement ...; read ...")``
  (indentation, signature and docstring kept), the grading test files with their conftests, a
  pytest.ini that makes plain ``pytest`` in DIR import DIR's copy (checked in DIR/conftest.py), and
  course.json naming the exercises.
- ``grade DIR [--json] [--timeout S]``: one pytest subprocess per exercise with a wall-clock timeout,
  in a temporary copy of DIR where the chapter's OTHER exercises hold the reference solution (so an
  exercise is graded on its own region: LSH's tests need MinHash signatures); all of an exercise's
  tests pass -> its points, else 0. A hang reports "timeout", a syntax error or
  a missing file reports "error" for the exercises it breaks; grading itself never crashes.
- ``list``: the exercises by chapter.

What it leaves out: partial credit within an exercise, hidden tests, sandboxing the student's code
(the grading subprocess runs it with the grader's permissions).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from minilife.common import UsageError

ROOT = Path(__file__).resolve().parents[1]  # the repository: minilife/ and tests/
PACKAGE = Path(__file__).resolve().parent
CHAPTERS = ("ch1", "ch2", "ch3", "ch4", "ch5")
MARKER = re.compile(r"^(?P<indent>[ \t]*)# (?P<end>end )?exercise: (?P<id>[a-z0-9_]+)\s*$")


@dataclass(frozen=True)
class Exercise:
    id: str
    chapter: str
    points: int
    module: str  # path of the file holding the region(s), relative to the repository
    task: str  # what to implement, one line
    read: str  # the paper/equation and the docstring to read
    tests: tuple[str, ...]  # pytest node ids (relative to the repository / workspace root)


def _ex(id, chapter, points, module, task, read, *tests):
    """``tests``: strings "tests/file.py:: name name ..." (one per file), expanded to node ids."""
    files = [t.split("::") for t in tests]
    return Exercise(id, chapter, points, module, task, read, tuple(f"{f}::{n}" for f, names in files
                                                                  for n in names.split()))


EXERCISES = {e.id: e for e in [
    # TESTS-BEGIN (node ids chosen by running them; see the module docstring)
    _ex("memory_bill", "ch1", 1, "minilife/budget.py",
        "memory_bill's bytes: weights (+ adapters), grads, fp32 master, Adam moments of the trainable params",
        "the budget.py module docstring and memory_bill's docstring (DTYPE_BYTES, MemoryOptions)",
        "tests/test_budget.py:: test_lora_bill_trains_only_adapters test_notes_72gb_for_8b "
        "test_notes_84gb_for_7b test_precision_recipes_bytes_per_param test_state_bytes_exact_after_real_step"),
    _ex("bpe_merge_step", "ch2", 3, "minilife/data/bpe_train.py",
        "one BPE merge step: rewrite each word holding the pair (left to right) and update the pair counts",
        "Sennrich et al. 2016 (BPE), learn_merges_naive (the textbook trainer) and learn_merges' comments",
        "tests/data/test_bpe.py:: test_a_path_is_never_trained_on_as_text test_decode_encode_round_trip "
        "test_decode_errors_and_invalid_utf8 test_encode_batch_matches_encode "
        "test_incremental_trainer_matches_naive_trainer test_known_answer_worked_by_hand "
        "test_never_merges_across_pretokens_or_special_tokens "
        "test_overlapping_pairs_count_every_position_but_merge_left_to_right test_progress_bar "
        "test_readable_encoder_equals_tiktoken_on_arbitrary_unicode "
        "test_readable_encoder_equals_tiktoken_on_same_ranks test_save_load_round_trip test_special_tokens "
        "test_special_tokens_match_longest_first test_stops_early_with_warning_when_pairs_run_out "
        "test_ties_compare_pairs_as_tuples_not_concatenations"),
    _ex("minhash_signature", "ch2", 2, "minilife/data/minhash.py",
        "the MinHash signature: per document, the minimum of each permutation over its shingle hashes",
        "Broder 1997, the minhash.py module docstring, permute and permutation_params",
        "tests/data/test_minhash.py:: test_batched_signatures_equal_per_document_minima "
        "test_documents_starting_exactly_at_a_chunk_edge test_minhash_estimate_within_4_standard_errors "
        "test_signatures_do_not_depend_on_python_hash_seed"),
    _ex("lsh_banding", "ch2", 2, "minilife/data/lsh.py",
        "LSH banding: split signatures into bands of rows, bucket equal bands, emit sorted unique pairs i < j",
        "Leskovec et al., Mining of Massive Datasets ch. 3.4, and the lsh.py module docstring (s_curve)",
        "tests/data/test_lsh.py:: test_clusters_are_transitive test_clusters_do_not_depend_on_document_order "
        "test_lsh_candidate_rate_follows_s_curve test_near_duplicates_keep_the_first_copy"),
    _ex("rope", "ch2", 2, "minilife/model/layers.py",
        "rotary embeddings: the angles pos * theta^(-2i/D) and the rotation of adjacent channel pairs",
        "Su et al. 2021 (RoFormer) eq. 13-15, the layers.py docstring, rope_cos_sin and apply_rope",
        "tests/model/test_layers.py:: test_gradcheck_rmsnorm_rope_swiglu "
        "test_rope_dot_product_depends_only_on_offset test_rope_matches_complex_rotation "
        "test_rotary_table_matches_rope_cos_sin_per_row"),
    _ex("rmsnorm", "ch2", 1, "minilife/model/layers.py",
        "RMSNorm's forward: x / sqrt(mean(x^2) + eps) * g, computed in float32 (or float64), cast back",
        "Zhang & Sennrich 2019 eq. 4 and the RMSNorm docstring",
        "tests/model/test_layers.py:: test_gradcheck_rmsnorm_rope_swiglu "
        "test_rmsnorm_matches_formula_and_keeps_dtype"),
    _ex("causal_attention", "ch2", 2, "minilife/model/attention.py",
        "the causal mask (queries are the last Tq of Tk positions) and softmax(Q K^T / sqrt(D), masked) V",
        "Vaswani et al. 2017 eq. 1, causal_mask's and attention_math's docstrings",
        "tests/model/test_attention.py:: test_attention_probability_dropout_is_applied_and_unbiased "
        "test_gradcheck_attention_math test_kv_cache_chunks_equal_full_pass "
        "test_module_math_and_sdpa_agree_and_prefix_sees_ahead test_paths_match_float64_formula"),
    _ex("adamw_step", "ch2", 2, "minilife/optim/adamw.py",
        "the AdamW update: decoupled decay, the moments, bias correction, the step",
        "Loshchilov & Hutter 2019 Algorithm 2 and the adamw.py module docstring",
        "tests/optim/test_adamw.py:: test_first_step_size_is_lr_times_sign "
        "test_matches_torch_adamw_with_groups_and_state_dict_roundtrip "
        "test_zero_gradient_gives_pure_decoupled_decay"),
    _ex("warmup_cosine", "ch2", 1, "minilife/optim/schedule.py",
        "linear warmup then half-cosine decay to min_lr",
        "Goyal et al. 2017, Loshchilov & Hutter 2017 (SGDR) eq. 5, and the schedule.py module docstring",
        "tests/optim/test_schedule.py:: test_hand_worked_values test_matches_closed_form test_properties"),
    _ex("sft_loss_mask", "ch3", 1, "minilife/align/chat.py",
        "the rendering's ids and loss mask: True on the assistant's content and its end marker only",
        "the chat.py module docstring and render_chat's docstring",
        "tests/align/test_chat.py:: test_add_chat_tokens_gives_the_new_ids_after_a_larger_model_vocab "
        "test_add_chat_tokens_keeps_old_rows_and_sets_new_ones_to_the_mean "
        "test_marker_spelled_in_text_stays_text test_rendering_and_loss_mask_match_a_hand_built_expectation "
        "test_serve_prompt_is_a_prefix_of_the_training_rendering test_text_markers_render_as_text"),
    _ex("lora_forward", "ch3", 2, "minilife/model/lora.py",
        "LoRA's forward on the adapted slices: W0 x + (alpha / r) B A x",
        "Hu et al. 2021 (LoRA) eq. 3, the lora.py module docstring and LoRAAdapter's (shapes of A, B)",
        "tests/model/test_lora.py:: test_adapters_disabled_gives_base_and_restores "
        "test_dora_gradients_flow_through_the_exact_norm test_dropout_acts_on_the_adapter_input_only "
        "test_forward_matches_float64_formula test_merged_equals_unmerged_and_unmerge_restores "
        "test_named_adapters_switch_and_each_matches_its_formula test_one_step_changes_only_adapters "
        "test_save_load_round_trip_in_a_fresh_model test_zero_B_equals_base_exactly"),
    _ex("lora_merge", "ch3", 2, "minilife/model/lora.py",
        "the merged rows W0 + (alpha / r) B A of the adapted slices, in float32",
        "Hu et al. 2021 (LoRA) sec. 4.1 (no inference latency) and LoRAAdapter.updated_rows' docstring",
        "tests/model/test_lora.py:: test_adapters_disabled_gives_base_and_restores "
        "test_bf16_merge_is_done_in_float32 test_dora_gradients_flow_through_the_exact_norm "
        "test_forward_matches_float64_formula test_merged_equals_unmerged_and_unmerge_restores "
        "test_named_adapters_switch_and_each_matches_its_formula test_one_step_changes_only_adapters "
        "test_save_load_round_trip_in_a_fresh_model test_zero_B_equals_base_exactly"),
    _ex("bradley_terry", "ch4", 1, "minilife/align/reward.py",
        "the Bradley-Terry loss -log sigmoid(r_c - r_r - margin), mean, plus the optional centering term",
        "Ouyang et al. 2022 eq. 1 and the reward.py module docstring",
        "tests/align/test_reward.py:: test_bt_loss_and_gradient_match_float64 test_bt_special_values "
        "test_from_gpt_copies_and_trains_the_head_and_trunk "
        "test_margin_and_centring_change_the_gradient_the_right_way"),
    _ex("gae", "ch4", 2, "minilife/align/ppo.py",
        "generalised advantage estimation backwards over valid tokens, and the returns A + V",
        "Schulman et al. 2016 (GAE) eq. 16 and gae's docstring",
        "tests/align/test_ppo.py:: test_gae_matches_closed_form_and_ignores_masked "
        "test_gae_with_gamma_lam_one_gives_reward_to_go"),
    _ex("ppo_clipped_loss", "ch4", 2, "minilife/align/ppo.py",
        "the clipped surrogate max(-A rho, -A clip(rho, 1-eps, 1+eps)) per token, which term won, log rho",
        "Schulman et al. 2017 (PPO) eq. 7 and clipped_surrogate's docstring",
        "tests/align/test_ppo.py:: test_bad_input test_clip_fraction_by_hand test_policy_loss_matches_numpy "
        "test_ratio_one_loss_is_minus_mean_advantage_and_gradients_stay_clean"),
    _ex("dpo_loss", "ch4", 2, "minilife/align/dpo.py",
        "the DPO family's per-pair losses from z = beta h - margin (sigmoid, robust, hinge, IPO, ...)",
        "Rafailov et al. 2023 eq. 7 and the dpo.py module docstring (one line per loss type)",
        "tests/align/test_dpo.py:: test_diagnostics_rewards_margins_accuracy "
        "test_every_variant_and_its_gradient_match_float64 test_hinge_is_zero_beyond_the_margin "
        "test_ipo_minimum_is_at_h_equals_one_over_two_beta test_loss_is_log2_when_policy_equals_reference "
        "test_robust_and_conservative_reduce_to_sigmoid_at_zero_and_robust_is_unbiased_under_flips "
        "test_sigmoid_gradient_wrt_the_log_ratio_is_minus_beta_sigmoid_minus_z "
        "test_simpo_ignores_the_reference"),
    _ex("loss_scaling", "ch5", 1, "minilife/optim/loss_scale.py",
        "the dynamic loss scaler's update: back off and skip on overflow, grow after growth_interval good steps",
        "Micikevicius et al. 2018 (Mixed Precision Training) sec. 3.2 and DynamicLossScaler's docstring",
        "tests/optim/test_loss_scale.py:: test_dynamic_scaler_skips_and_halves_then_grows",
        "tests/chapters/test_ch5_precision.py:: test_main_smoke"),
    _ex("grad_accumulation", "ch5", 1, "minilife/align/sft.py",
        "split_step's micro-batches and N_step, the trained tokens of the whole step every loss sum is divided by",
        "the sft.py module docstring (token-weighted accumulation) and split_step's docstring",
        "tests/align/test_sft.py:: test_accumulated_gradient_equals_the_big_batch_gradient "
        "test_any_accumulation_split_gives_the_big_batch_mean"),
    _ex("online_softmax", "ch5", 3, "minilife/kernels/flash_attention_torch.py",
        "the online-softmax step of a key tile: new running max, rescale l and acc by exp(m - m_new), add p V",
        "Dao et al. 2022 (FlashAttention) Algorithm 1 and the flash_attention_torch.py module docstring",
        "tests/kernels/test_flash_attention.py:: test_fallback_when_triton_cannot_run_on_cpu "
        "test_fallback_when_triton_is_missing test_torch_tiled_matches_float64_reference"),
    # TESTS-END
]}


def chapter_exercises(chapter: str) -> list[Exercise]:
    if chapter not in CHAPTERS:
        raise UsageError(f"unknown chapter {chapter!r}; valid chapters: {', '.join(CHAPTERS)}")
    return [e for e in EXERCISES.values() if e.chapter == chapter]


# regions


def find_regions(text: str, where: str = "<text>") -> list[tuple[str, int, int, str]]:
    """Marked regions of a source text: [(id, start, end, indent)] with lines[start] the opening
    marker and lines[end] the closing one (0-based). Unpaired or nested markers raise a ValueError
    naming ``where`` and the line."""
    regions, open_ = [], None
    for i, line in enumerate(text.splitlines()):
        m = MARKER.match(line)
        if not m:
            continue
        if not m["end"]:
            if open_ is not None:
                raise ValueError(f"{where}:{i + 1}: exercise {m['id']!r} opens inside {open_[0]!r} (line {open_[1] + 1})")
            open_ = (m["id"], i, m["indent"])
        elif open_ is None or open_[0] != m["id"]:
            raise ValueError(f"{where}:{i + 1}: 'end exercise: {m['id']}' without its opening marker")
        else:
            regions.append((open_[0], open_[1], i, open_[2]))
            open_ = None
    if open_ is not None:
        raise ValueError(f"{where}:{open_[1] + 1}: exercise {open_[0]!r} is never closed")
    return regions


def library_regions(package: Path = PACKAGE) -> dict[str, list[tuple[str, int, int]]]:
    """{id: [(file relative to the repository, start, end), ...]} for every region under ``package``."""
    found: dict[str, list[tuple[str, int, int]]] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for ex_id, start, end, _ in find_regions(path.read_text(encoding="utf-8"), rel):
            found.setdefault(ex_id, []).append((rel, start, end))
    return found


def stub_message(ex: Exercise) -> str:
    return f"{ex.id}: implement {ex.task}; read {ex.read}"


def strip_regions(text: str, ids: set[str], where: str = "<text>") -> str:
    """``text`` with the body of every region whose id is in ``ids`` replaced by a NotImplementedError
    (the markers stay, so a solution can be pasted between them)."""
    lines = text.splitlines(keepends=True)
    for ex_id, start, end, indent in reversed(find_regions(text, where)):
        if ex_id in ids:
            lines[start + 1:end] = [f"{indent}raise NotImplementedError({stub_message(EXERCISES[ex_id])!r})\n"]
    return "".join(lines)


# make


PYTEST_INI = """[pytest]
testpaths = tests
addopts = -ra --import-mode=importlib
pythonpath = .
markers =
    slow: slower than a few seconds
    gpu: needs CUDA
"""

ROOT_CONFTEST = '''"""Workspace setup: import THIS directory's minilife (not an installed one); small hypothesis runs."""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("HYPOTHESIS_PROFILE", "ci")
sys.path.insert(0, str(HERE))
import minilife  # noqa: E402

if Path(minilife.__file__).resolve().parent != HERE / "minilife":
    raise ImportError(f"the grading imported minilife from {minilife.__file__}, not from {HERE}: "
                      "run pytest inside the workspace")
'''


def make(chapter: str, out: str | os.PathLike, *, solved: set[str] | frozenset = frozenset()) -> Path:
    """Write the student workspace of ``chapter`` to ``out`` (absent or empty). ``solved``: exercise ids
    to leave with their reference solution (instructors' and the tests' partial workspaces)."""
    exercises = chapter_exercises(chapter)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out}: exists and is not an empty directory")
    unknown = set(solved) - {e.id for e in exercises}
    if unknown:
        raise UsageError(f"--solved: not exercises of {chapter}: {', '.join(sorted(unknown))}")
    shutil.copytree(PACKAGE, out / "minilife", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                    dirs_exist_ok=True)
    strip = {e.id for e in exercises} - set(solved)
    for e in exercises:
        path = out / e.module
        path.write_text(strip_regions(path.read_text(encoding="utf-8"), strip, e.module), encoding="utf-8")
    test_files = {t.split("::")[0] for e in exercises for t in e.tests}
    for rel in sorted(test_files):
        for parent in [Path(rel).parent, *Path(rel).parent.parents][:-1]:  # tests/x/conftest.py, tests/conftest.py
            if (ROOT / parent / "conftest.py").is_file():
                (out / parent).mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / parent / "conftest.py", out / parent / "conftest.py")
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, out / rel)
    (out / "pytest.ini").write_text(PYTEST_INI)
    (out / "conftest.py").write_text(ROOT_CONFTEST)
    course = {"chapter": chapter, "exercises": [
        {"id": e.id, "points": e.points, "module": e.module, "task": e.task, "read": e.read, "tests": list(e.tests)}
        for e in exercises]}
    (out / "course.json").write_text(json.dumps(course, indent=1) + "\n")
    return out


# grade


def _run_pytest(workspace: Path, tests: list[str], timeout: float) -> tuple[str, str]:
    """('passed' | 'failed' | 'error' | 'timeout', one line of detail) for one exercise's tests."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", "-rN",
           "-m", "not slow", *tests]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(cmd, cwd=workspace, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)  # own process group: a hang is killed whole
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", f"no result within {timeout:g} s (an endless loop?)"
    if proc.returncode == 0:
        return "passed", ""
    lines = output.splitlines()
    errors = [ln[1:].strip() for ln in lines if ln.startswith("E ") and ln[1:].strip()]  # pytest's E lines
    hit = next((e for e in errors if re.match(r"^\w*(Error|Exception|Interrupt)\b|^assert", e)), None) or \
        next((ln.strip() for ln in lines if "not found" in ln or "ERROR" in ln), None) or (errors or [None])[0]
    detail = (hit or (lines[-1] if lines else f"pytest exit code {proc.returncode}"))[:300]
    return ("failed" if proc.returncode == 1 else "error"), detail


def restore_regions(text: str, reference: str, ids: set[str], where: str = "<text>") -> str:
    """``text`` with the regions whose id is in ``ids`` put back to their content in ``reference``
    (matched by id and order; a region the student removed stays as it is)."""
    ref = {}
    ref_lines = reference.splitlines(keepends=True)
    for ex_id, start, end, _ in find_regions(reference, where):
        ref.setdefault(ex_id, []).append(ref_lines[start + 1:end])
    lines = text.splitlines(keepends=True)
    regions = find_regions(text, where)
    for k, (ex_id, start, end, _) in reversed(list(enumerate(regions))):
        order = sum(1 for r in regions[:k] if r[0] == ex_id)
        if ex_id in ids and order < len(ref.get(ex_id, [])):
            lines[start + 1:end] = ref[ex_id][order]
    return "".join(lines)


def _isolated_copy(workspace: Path, dest: Path, others: set[str]) -> Path:
    """A copy of ``workspace`` in which every exercise in ``others`` holds the reference solution, so an
    exercise is graded on its own region only (tests of LSH need signatures, LoRA's merge its forward)."""
    shutil.copytree(workspace, dest, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache"))
    for module in sorted({EXERCISES[i].module for i in others if i in EXERCISES}):
        path, ref = dest / module, ROOT / module
        try:
            path.write_text(restore_regions(path.read_text(encoding="utf-8"), ref.read_text(encoding="utf-8"),
                                            others, module), encoding="utf-8")
        except (OSError, ValueError, UnicodeDecodeError):
            pass  # a missing or broken file: the exercises that import it report the error themselves
    return dest


def grade(workspace: str | os.PathLike, *, timeout: float = 300.0, only: list[str] | None = None) -> dict:
    """Run each exercise's tests in ``workspace``; returns {chapter, exercises: [...], total, max}."""
    workspace = Path(workspace)
    try:
        course = json.loads((workspace / "course.json").read_text())
        entries = course["exercises"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"{workspace}: not a workspace made by `python -m minilife.course make` "
                         f"(course.json: {e})") from None
    if only is not None:
        missing = set(only) - {x["id"] for x in entries}
        if missing:
            raise UsageError(f"--only: not exercises of this workspace: {', '.join(sorted(missing))}")
        entries = [x for x in entries if x["id"] in only]
    rows = []
    for x in entries:
        t0 = time.monotonic()
        others = {y["id"] for y in course["exercises"]} - {x["id"]}
        with tempfile.TemporaryDirectory(prefix="minilife-grade-") as tmp:
            isolated = _isolated_copy(workspace, Path(tmp) / "ws", others)
            status, detail = _run_pytest(isolated, x["tests"], timeout)
        rows.append({"id": x["id"], "status": status, "points": x["points"] if status == "passed" else 0,
                     "max": x["points"], "seconds": round(time.monotonic() - t0, 1), "detail": detail})
    return {"chapter": course.get("chapter"), "exercises": rows, "total": sum(r["points"] for r in rows),
            "max": sum(r["max"] for r in rows)}


def format_table(result: dict) -> str:
    lines = [f"{'exercise':<20} {'status':<8} {'points':>7}  detail"]
    for r in result["exercises"]:
        lines.append(f"{r['id']:<20} {r['status']:<8} {r['points']:>3}/{r['max']:<3}  {r['detail']}")
    lines.append(f"{'total':<20} {'':<8} {result['total']:>3}/{result['max']:<3}")
    return "\n".join(lines)


# command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minilife.course", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_make = sub.add_parser("make", help="write a student workspace for a chapter")
    p_make.add_argument("chapter", help=f"one of {', '.join(CHAPTERS)}")
    p_make.add_argument("--out", required=True, help="the workspace directory (absent or empty)")
    p_make.add_argument("--solved", default="", help="comma-separated exercise ids to keep solved")
    p_grade = sub.add_parser("grade", help="grade a workspace: a points table per exercise")
    p_grade.add_argument("workspace")
    p_grade.add_argument("--json", action="store_true", help="print the result as JSON (for instructors)")
    p_grade.add_argument("--timeout", type=float, default=300.0, help="seconds per exercise before 'timeout'")
    p_grade.add_argument("--only", default=None, help="comma-separated exercise ids to grade (default: all)")
    sub.add_parser("list", help="the exercises by chapter")
    args = parser.parse_args(argv)
    try:
        if args.command == "make":
            solved = {s for s in args.solved.split(",") if s}
            out = make(args.chapter, args.out, solved=solved)
            n = len(chapter_exercises(args.chapter))
            print(f"wrote {out}: {n} exercises of {args.chapter}; run `pytest` there, or "
                  f"`python -m minilife.course grade {out}`")
        elif args.command == "grade":
            if not args.timeout > 0:
                raise UsageError(f"--timeout must be > 0, got {args.timeout}")
            only = [s for s in args.only.split(",") if s] if args.only else None
            result = grade(args.workspace, timeout=args.timeout, only=only)
            print(json.dumps(result, indent=1) if args.json else format_table(result))
        else:
            for ch in CHAPTERS:
                print(ch)
                for e in chapter_exercises(ch):
                    print(f"  {e.id:<20} {e.points} pt  {e.module}: {e.task}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
