"""The world model's card: what it is, how it was made, and how good and fast it is, from a run's own records.

`write_model_card(run, model_dir)` reads the run's training histories, the evaluation (`eval.json`) and, when
present, the speed benchmark (benchmarks/results/world-cpu.json), plots the loss curves, and writes MODEL_CARD.md.
The histories are also kept, compacted, in the model folder (`training_history.json`), so that a card can be written
again from the shipped files alone when the run folder is gone.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from framecast.stream.worldmodel.recipe import (
    CHUNK_FRAMES, SHIFT, STREAM_GUIDANCE, STREAM_STEPS, STUDENT_STEPS, TEACHER_FILE, WINDOW_FRAMES, WORLD_DIT,
)

SPEED_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "world-cpu.json"
SIZE_BUDGET_BYTES = 20 * 1024 * 1024
HISTORY_FILE = "training_history.json"
STATE_FILES = {"teacher": "teacher_state.pt", "student": "student_state.pt", "guidance": "guidance/guidance_state.pt"}
CURVE_POINTS = 400  # loss-curve points a compacted history keeps


def plot_loss(history: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    losses, steps = np.asarray(history["loss"]), history["step"]
    figure, axes = plt.subplots(figsize=(6, 3.2))
    axes.plot(steps, losses, alpha=0.25, label="step")
    window = max(1, len(losses) // 40)
    if len(losses) > window:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1 :], smooth, label=f"mean of {window}")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(label)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _history(run: Path, state_file: str) -> dict | None:
    path = run / state_file
    if not path.exists():
        return None
    return torch.load(path, weights_only=False, map_location="cpu")["history"]


def compact_history(history: dict) -> dict:
    """A history small enough to ship: its settings and records as they are, its curves at <= CURVE_POINTS points
    (the last always kept), and the final loss (mean of the last 50) and length of the whole run. The guidance
    distillation counts updates ("update"), the others steps ("step"); compacted, both are "step"."""
    steps, losses = history.get("step") or history.get("update") or [], history.get("loss", [])
    keep = sorted(set(range(0, len(losses), max(1, -(-len(losses) // CURVE_POINTS)))) | {len(losses) - 1}) if losses else []
    compact = {k: v for k, v in history.items() if k not in ("step", "update", "loss", "seconds", "steps_used")}
    compact.update(step=[steps[i] for i in keep], loss=[float(losses[i]) for i in keep],
                   seconds=[float(history["seconds"][i]) for i in keep] if history.get("seconds") else [],
                   final_loss=float(np.mean(losses[-50:])) if losses else None, final_step=steps[-1] if steps else 0)
    return compact


def training_histories(run: Path, model_dir: Path) -> dict[str, dict]:
    """Each stage's history: from the run's state files, else from the model folder's `training_history.json`
    (what an earlier card kept); the merged, compacted set is written back there."""
    path = model_dir / HISTORY_FILE
    stored = json.loads(path.read_text()) if path.exists() else {}
    histories = {}
    for stage, state_file in STATE_FILES.items():
        history = _history(run, state_file)
        if history is not None:
            histories[stage] = compact_history(history)
        elif stage in stored:
            histories[stage] = stored[stage]
    path.write_text(json.dumps(histories, indent=1))
    return histories


TARGET_TEXTS = {
    "ode": "the endpoint of the teacher's probability-flow ODE from the same noisy latents under the same "
    "(student-made) context (Euler, {substeps} steps): deterministic given the input, so a squared error fits it.",
    "renoise": "where the teacher's own sampler (clean estimate, fresh noise at the next sigma of its {substeps}-step "
    "list) takes the same noisy latents under the same (student-made) context.",
    "agent-renoise": "a target made of two teacher answers from the same noisy latents under the same (student-made) "
    "context. Around the agent it is where the teacher's own sampler takes them (clean estimate, fresh noise at the "
    "next sigma of its {substeps}-step list); elsewhere it is the endpoint of the teacher's probability-flow ODE "
    "(Euler, {substeps} steps). Why: the teacher's ODE draws the agent's shape far worse than its sampler does (on "
    "first chunks, 30 of 96 shapes right at 8 Euler steps against 66 of 96 with the sampler at 32 steps), and "
    "a student fitted to it inherits that. A squared error onto the sampler's random answer everywhere blurs "
    "what is random in it (falling rain and snow, read as clear weather), and the ODE keeps that sharp. "
    "Measured on run 5's teacher, from the same start, 900 frames, 4 steps: after 104 rollouts the ODE target "
    "gave 63.8% adherence (shape 63.8%) and 85.0% action following; after 122 rollouts the sampler everywhere "
    "gave 62.5% (shape 72.6%, weather 89.6%) and 78.6%. After 86 rollouts this mix gave 73.5% (shape 73.7%, "
    "weather 99.9%) and 77.8%. The teacher at 4 steps, where all three started, scores 70.4% and 83.5%.",
}
TARGET_TEXTS["agent-redraw"] = TARGET_TEXTS["agent-renoise"] + (
    " Around the agent the teacher's sample is then drawn again by the world (`models/world/agent_redraw.py`): "
    "decoded, its agent read, wiped to the ground colour and the prompt's sprite pasted at the same centre as the "
    "renderer draws it, then encoded. The teacher decides where the agent goes (the actions, the physics); the "
    "world, which knows exactly what the prompt's agent looks like, decides its shape and colour. Why: the agent's "
    "shape was the one slot the student kept missing (diamonds and squares drawn with rounded corners, read as "
    "circles), and the teacher's own samples miss it the same way, so a student fitted to them could not do "
    "better. Frames where no single agent is read (none, or two where the teacher was unsure) keep the ODE answer."
)
TARGET_TEXTS["agent-physics"] = TARGET_TEXTS["agent-redraw"] + (
    " The sprite is pasted where the world's physics takes the agent (`models/world/world.py`: `agent_path`) from "
    "the student's own last two context frames (decoded and read) under the chunk's keys, rather than where the "
    "teacher drew it: the teacher's guided stream itself jumps the agent by 2.88 px on average (6.51 at most) "
    "across a prompt switch, and a student fitted to the teacher's placement inherits that. The agent's physics "
    "has no collisions, so two sightings and the keys fix its path. Where the context shows no agent (the first "
    "chunk of a rollout), the teacher's place."
)


def _warmup_text(history: dict | None) -> str:
    """The rollouts' warm-up (`StudentSettings.warmup_chunks`), when the run had one."""
    chunks = (history or {}).get("settings", {}).get("warmup_chunks", 0)
    if not chunks:
        return ""
    return (
        f" Before its trained chunks, a rollout streams 0 to {chunks} chunks (uniform) with the student alone (its "
        "own sampler, no teacher, no gradients), half of them under another clip's prompt, so that the trained "
        "chunks follow a prompt switch after a long scene. Why: run 8's student lost what it had drawn deep in a "
        "scene (on the 1,800-frame eval script, squares and diamonds rounded into circles 20 to 50 frames into "
        "scenes it began right, and rain thinned until it read as clear), while its 8-chunk rollouts from an empty "
        "window never reached such contexts, and training clips switch at most 4 chunks before their end. Rolling "
        "out past the trained horizon and distilling there is Self-Forcing++'s fix for long streams."
    )


def _target_text(history: dict | None) -> str:
    """The student's regression target, as its settings name it (older runs predate the choice: the ODE)."""
    settings = (history or {}).get("settings", {})
    guidance = settings.get("guidance", 1.0)
    guided = "" if guidance == 1 else (
        f" The teacher's flow in every answer is classifier-free guided at scale {guidance:g}: null + {guidance:g} x "
        "(prompt - null), the null prompt with a context window of its own fed the same clean chunks (context K/V "
        "depend on the prompt through every block's cross-attention). Guidance sharpens what the prompt decides: "
        "run 7's teacher streaming the 900-frame eval script at 8 steps read 74.4% of frames fully right unguided (weather "
        "81.7%, the agent's shape 89.6%, drawn with rounded corners: diamonds and squares read as circles) and 91.7% "
        "guided at 1.5 (weather 100%, shape 91.7%), 92.4% at 1.25 and 91.3% at 2 (probed early in the run, after "
        "~600 null-prompt steps, 2 and 3 washed out the time of day and the weather). The "
        "student learns the guided flow and streams at the cost of one pass.")
    return TARGET_TEXTS[settings.get("target_sampler", "ode")].format(substeps=settings.get("teacher_substeps", 8)) + guided + (
        " Why not DMD: a second (critic) network and its updates would double a CPU budget that is the constraint "
        "here. Why not regression onto the recorded ground truth: the parts of a frame that the context leaves open "
        "(where the objects are in the first chunk, where rain falls after a switch) would be averaged into blur."
    )


def _teacher_text(history: dict | None) -> str:
    """The teacher's recipe, from the settings in force at its end (a resumed run may have changed them)."""
    settings = ((history or {}).get("changes") or [history or {}])[-1].get("settings", {})
    clean, dropout = settings.get("clean_chunk_share", 0.4), settings.get("prompt_dropout", 0.0)
    text = (
        "**Teacher: diffusion forcing at chunk granularity.** Each 3-frame chunk of a "
        f"{settings.get('window_frames', 9)}-frame training window (at a random offset in a clip) gets its own noise "
        f"level from the shifted schedule, {clean:.0%} of chunks stay clean, and one forward under the engine's "
        f"block-causal, {WINDOW_FRAMES}-frame windowed mask trains every chunk against every mix of clean and noisy "
        "context, including the clean context the engine's context pass gives at inference. Teacher forcing would "
        "train one chunk per clip on clean context only: fewer examples per forward on a CPU budget. Frames shown "
        "under an earlier prompt than the clip's are clean context without loss, which is what a re-cache after a "
        "prompt switch asks: the look from the new prompt, positions and motion from the context. Flow-matching loss "
        "(velocity noise - x0) with extra weight under the agent, AdamW, cosine schedule fitted to the time cap, EMA "
        "of the weights."
    )
    if dropout:
        text += (f" {dropout:.0%} of samples see the null prompt (all-zero text rows, what Wan pads prompts with), so "
                 "the teacher also knows the unconditional flow that classifier-free guidance pushes away from.")
    if (history or {}).get("changes"):
        text += f" (These settings from step {history['changes'][-1]['step']:,} of the run on; see the run history.)"
    return text


def _student_start(history: dict | None) -> str:
    """What the student's weights started from (older histories predate the record: the teacher)."""
    started = (history or {}).get("started_from")
    if not isinstance(started, dict) or not started.get("init_from"):  # run 6 recorded the plain word "teacher"
        return "the teacher"
    if not started.get("rebase_from"):
        return f"an earlier student: `{started['init_from']}`"
    return (f"an earlier student moved by the teacher's change since: `{started['init_from']}` + (teacher - "
            f"`{started['rebase_from']}`)")


def _stream_guidance_text(results: dict | None, distilled: dict | None = None) -> str:
    """How the student streams: unguided (as guidance-distilled, or plain), or classifier-free guided, with what the
    eval measured guidance to add."""
    scale = ((results or {}).get("settings") or {}).get("student_guidance", STREAM_GUIDANCE)
    if scale == 1 and distilled:
        baked = distilled.get("settings", {}).get("guidance", "?")
        return (f"- **Guidance**: distilled in (see Recipe). The student streams unguided, in one pass, what the "
                f"student it was distilled from streamed under classifier-free guidance at {baked:g}: every command "
                f"streams {len(STREAM_STEPS)} of its 4 steps, {STREAM_STEPS}, at the cost of {len(STREAM_STEPS) + 1} "
                "plain DiT calls a chunk (the steps and the context pass). `--guidance` above 1 still guides on top.")
    if scale == 1:
        return "- **Guidance**: none; the student streams its own flow."
    text = (f"- **Guidance**: the student streams with classifier-free guidance at {scale:g} (`EngineConfig.guidance`; "
            f"`--guidance` on every command): null + {scale:g} x (prompt - null). The student inherited the teacher's "
            "null-prompt flow (all-zero text rows), so guiding it sharpens what the prompt decides, as guiding the "
            "teacher did. The null prompt keeps a KV cache of its own; prompt and null rows run as one batch of two, "
            "~1.5x the DiT's time on this CPU (two passes would cost 2x). Guided at 4 steps the stream makes 28 frames/s "
            f"here, under the goal of 30, so every command streams {len(STREAM_STEPS)} of the 4 steps, {STREAM_STEPS}: "
            "each step sees inputs the student trained on (500 after 1000 as in its 2-step schedule, 250 after 500 as "
            "in the 4-step one), at the 4-step stream's quality (the table's rows).")
    rows = (results or {}).get("rows", {})
    guided, plain = rows.get("student 4 steps"), rows.get("student 4 steps unguided")
    if guided and plain:
        text += (f" On the evaluation script, 4 steps: adherence {plain['prompt_adherence']:.1f}% unguided -> "
                 f"{guided['prompt_adherence']:.1f}% guided, actions {plain['action_following']:.1f}% -> "
                 f"{guided['action_following']:.1f}%, new prompt visible within "
                 f"{plain['switch_frames_to_visible_max']:.0f} -> {guided['switch_frames_to_visible_max']:.0f} "
                 "frames at most.")
    return text


def _guidance_distillation_text(history: dict) -> str:
    """The guidance distillation stage (guidance_distill.py), from its settings."""
    settings = history.get("settings", {})
    scale, schedules = settings.get("guidance", 1.5), settings.get("schedules", [])
    return (
        f"**Guidance distillation: the guided student in one pass.** The distilled student above streams best under "
        f"classifier-free guidance at {scale:g}, which runs every DiT call on the prompt and on the null prompt (~1.5x "
        "the DiT's time). A copy of it (the pupil) learns, unguided, the clean estimates that it makes guided: the "
        "first stage of Meng et al.'s guided-model distillation, on the pupil's own rollouts. Each chunk runs the "
        "pupil's sampler as the engine does; at every step its clean estimate is regressed onto the guided student's "
        "from the same noisy latents under the same context, and both sides commit the pupil's output as context "
        f"(Self-Forcing's exposure-bias fix). Rollouts of {settings.get('rollout_chunks', '?')} scored chunks after "
        f"0 to {settings.get('warmup_chunks', '?')} unscored ones, batch {settings.get('batch', '?')}, half of them "
        "switching prompt with re-cache; step lists " + ", ".join(str(tuple(s)) for s in schedules)
        + f" (weights {tuple(settings.get('schedule_weights', ()))}); one AdamW step per chunk at lr "
        f"{settings.get('learning_rate', '?')}, EMA {settings.get('ema_decay', '?')}. No data: prompts and keys are "
        "drawn as the evaluation draws them. Every command streams the result unguided."
    )


def _minutes(history: dict | None) -> str:
    return "?" if not history or not history["seconds"] else f"{history['seconds'][-1] / 60:.1f}"


def write_model_card(run: Path, model_dir: Path) -> Path:
    histories = training_histories(run, model_dir)
    teacher, student, guidance = (histories.get(stage) for stage in ("teacher", "student", "guidance"))
    for history, name, label in ((teacher, "teacher", "flow-matching loss"), (student, "student", "distillation loss"),
                                 (guidance, "guidance", "guidance distillation loss")):
        if history and not history.get("kept_by_hand") and len(history["loss"]) > 1:  # a summary: the shipped plot stays
            plot_loss(history, model_dir / f"{name}_loss.png", label)
    results = json.loads((model_dir / "eval.json").read_text()) if (model_dir / "eval.json").exists() else None
    speed = json.loads(SPEED_RESULTS.read_text()) if SPEED_RESULTS.exists() else None
    files = sorted(p for p in model_dir.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in files)
    params = sum(np.prod(s) for s in _dit_shapes(model_dir / TEACHER_FILE)) if (model_dir / TEACHER_FILE).exists() else 0
    lines = [
        "# FrameCast world model (the embedded default)",
        "",
        "A world model of FrameCast's procedural 2-D world (`models/world/`), conditioned on text prompts in the "
        "world's closed vocabulary (terrain, weather, time of day, the agent's shape and colour) and on the player's "
        "keys (none/up/down/left/right, one per frame). It streams 128x128 frames through the same engine, cache and "
        "sampler as the causal Wan2.1 checkpoints, on a laptop CPU, with nothing to download.",
        "",
        "## Files",
        "",
        "| file | bytes |",
        "| --- | ---: |",
        *[f"| `{p.name}` | {p.stat().st_size:,} |" for p in files],
        f"| **total** | **{total:,}** ({total / 2**20:.1f} MiB; budget {SIZE_BUDGET_BYTES / 2**20:.0f} MiB: "
        f"{'within' if total <= SIZE_BUDGET_BYTES else 'OVER'}) |",
        "",
        "## Architecture",
        "",
        f"- **DiT**: the causal Wan2.1 DiT (`models/dit.py`) at preset `world`: width {WORLD_DIT.dim}, "
        f"{WORLD_DIT.num_layers} layers, {WORLD_DIT.num_heads} heads, FFN {WORLD_DIT.ffn_dim}, patch 1x2x2 (8x8 tokens "
        f"per frame), {int(params):,} parameters, stored in bfloat16; a per-frame action embedding ({WORLD_DIT.num_actions} "
        "ids) added to the time conditioning.",
        f"- **Streaming**: chunks of {CHUNK_FRAMES} latent frames (= video frames), a rolling KV cache of "
        f"{WINDOW_FRAMES} frames with no sink frames (every attended RoPE offset stays below {WINDOW_FRAMES}, as in "
        f"training, however long the stream runs), shift {SHIFT:g}; student step lists "
        + ", ".join(f"{k}: {v}" for k, v in STUDENT_STEPS.items()) + "; every command streams "
        f"{STREAM_STEPS} by default (a sub-list of the 4-step one: see Guidance); prompt switches re-cache the window "
        "(LongLive).",
        _stream_guidance_text(results, guidance),
        "- **Text encoder** (`models/world/text_encoder.py`): the prompt is parsed into its five slots (any phrasing "
        "of a scene gives the same embedding), one token per slot, a pre-norm transformer layer: output [1, 5, 64], "
        "shaped like umT5's [1, tokens, 4096] for Wan. Trained jointly with the teacher.",
        "- **Autoencoder** (`models/world/autoencoder.py`): 128x128x3 -> 16x16x16, one latent frame per video frame, "
        "a streaming decoder that carries its state between chunks; see `autoencoder_report.md`.",
        "",
        "## Recipe",
        "",
        "Data: episodes of the world with random held keys (the policy `HeldKeys`), a random scene per episode and, in "
        "half of the clips, one prompt switch at a chunk boundary; 24-frame clips encoded once by the autoencoder.",
        "",
        _teacher_text(teacher),
        "",
        "**Student: trajectory distillation on self-rollouts.** The student (initialised from "
        f"{_student_start(student)}) streams "
        "clips exactly as the engine does: its own few-step sampler with fresh noise between steps (1, 2 or 4 steps "
        "per rollout), a clean context pass of its own output, the clip's actions and prompt switch with re-cache. "
        "Every chunk after the first is therefore conditioned on the student's own past, the exposure-bias fix of "
        "Self-Forcing. Per chunk one exit step is drawn (Self-Forcing's trick: gradients at one step only); the "
        f"student's clean estimate there is regressed onto {_target_text(student)}{_warmup_text(student)}",
        "",
        *([_guidance_distillation_text(guidance), ""] if guidance else []),
        "## Training",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| stage | steps | minutes | final loss (mean of last 50) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, history in (("teacher", teacher), ("student", student), ("guidance distillation", guidance)):
        if history:
            steps, loss = history["final_step"], history.get("final_loss")
            lines.append(f"| {name} | {steps:,} | {_minutes(history)} | {'?' if loss is None else f'{loss:.4f}'} |")
    lines += ["", "![teacher loss](teacher_loss.png) ![student loss](student_loss.png)"
              + (" ![guidance distillation loss](guidance_loss.png)" if guidance else ""), ""]
    kept_by_hand = [name for name, h in histories.items() if h.get("kept_by_hand")]
    if kept_by_hand:
        lines += [f"The {' and '.join(kept_by_hand)} rows and plots are kept from earlier cards "
                  f"(`{HISTORY_FILE}`): the full histories were lost with the machine that trained them.", ""]
    if (run / "RUN_HISTORY.md").exists():  # runs chained by hand (--init-from) before this one: their record
        lines += [(run / "RUN_HISTORY.md").read_text().strip(), ""]
    lines += ["## Evaluation (`framecast eval world`)", ""]
    if results:
        s = results["settings"]
        lines += [
            f"One stream of {s['frames']} frames per row under the same script: random held keys, a new random scene "
            f"every {s['switch_every']} frames; every frame read back by the exact pixel readers "
            "(`models/world/ground_truth.py`). Adherence excludes the 3 frames after each switch (the switch columns "
            "cover them). How far to trust one script: the model gets a scene right or wrong for most of its 60 "
            "frames, so adherence moves in steps of a scene; the run-7 student read 90.7% on the 900-frame script of "
            "seed 10,000 and 81.5% on that of seed 20,000, and 86.1% and 84.5% on their 1,800-frame scripts.",
            "",
            results["table"],
            "",
            *([f"The rows {', '.join(repr(r) for r in results['carried_rows']['rows'])} are carried from "
               f"{results['carried_rows']['from']}: {results['carried_rows']['why']}.", ""]
              if results.get("carried_rows") else []),
            "![metrics](eval_metrics.png)",
            "",
            "Frames at the same media times, one row per model:",
            "",
            "![samples](eval_samples.png)",
            "",
        ]
        if "drift" in results:
            d = results["drift"]
            streams = s.get("long_streams", 1)
            lines += [
                f"### Drift: {streams} student stream{'s' if streams > 1 else ''} of {s['long_frames']} frames "
                f"({len(STREAM_STEPS)} steps, the default stream; seeds from {s['seed'] + 1}), a new scene every {s['long_switch_every']} frames; "
                "the first and the last windows of all streams graded together", "",
                *([f"The last {s['drift_window']} frames of each stream replay the scenes and keys of its first "
                   f"{s['drift_window']} (`replay_opening`), so both windows grade the same asks and what differs is "
                   "how long the model has streamed. With different scenes in the two windows (up to run 9), one "
                   "stream's windows differed by up to 13 points by the luck of the draw.", ""]
                  if s.get("drift_replay") else []),
                d["table"], "",
                "Last minus first (points): " + ", ".join(f"{k} {v:+.2f}" for k, v in d["difference"].items()), "",
                *(["Per stream, adherence / actions last minus first: " + "; ".join(
                    f"{v['prompt_adherence']:+.1f} / {v['action_following']:+.1f}" for v in d["streams"]), ""]
                  if len(d.get("streams", [])) > 1 else []),
                "![drift](eval_drift.png)", "",
            ]
    if speed:
        lines += ["## Speed (`benchmarks/world.py`)", "", speed.get("markdown", ""), ""]
    if results:
        lines += _targets(results, speed)
    lines += [
        "## Reproduce",
        "",
        "```",
        "framecast train world --out runs/world --ship      # ~2 h on a 2-core CPU; resumable; --device cuda",
        "framecast eval world                               # this card's evaluation, on the shipped files",
        "```",
        "",
    ]
    path = model_dir / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def _targets(results: dict, speed: dict | None) -> list[str]:
    """The issue's targets against this model's measurements, met or not."""
    rows = results["rows"]
    default = f"student {len(STREAM_STEPS)} steps"  # what every command streams
    student, four = (rows.get(default) or rows.get("student 4 steps")), rows.get("student 4 steps")
    which = default if rows.get(default) else "student 4 steps"
    scale = results.get("settings", {}).get("student_guidance", STREAM_GUIDANCE)
    how = "unguided" if scale == 1 else f"guided at {scale:g}"
    table = ["## Targets", "", f"Quality targets on the default stream (`{which}`, {how}); the teacher comparison on "
             "the 4-step student, as the goal names it.", "", "| target | measured | met |", "| --- | --- | :-: |"]

    def row(target: str, measured: str, met: bool) -> None:
        table.append(f"| {target} | {measured} | {'yes' if met else '**no**'} |")

    if student:
        row("prompt adherence >= 95%", f"{student['prompt_adherence']:.1f}% ({which})", student["prompt_adherence"] >= 95)
        row("action following >= 90%", f"{student['action_following']:.1f}%", student["action_following"] >= 90)
        row("new prompt visible within 1 chunk (3 frames)", f"{student['switch_frames_to_visible_mean']:.1f} frames mean, "
            f"{student['switch_frames_to_visible_max']:.0f} max", student["switch_frames_to_visible_max"] <= 3)
        row("agent jump <= 2 px at a switch", f"{student['switch_agent_jump_px_mean']:.2f} px mean, "
            f"{student['switch_agent_jump_px_max']:.2f} max", student["switch_agent_jump_px_max"] <= 2)
    if "drift" in results:
        worst = max(abs(results["drift"]["difference"][k]) for k in ("prompt_adherence", "action_following"))
        streams = results["settings"].get("long_streams", 1)
        change = results["drift"]["difference"]
        row(f"drift <= 3 points (first vs last 500 of 5,000 frames, {streams} stream{'s' if streams > 1 else ''})",
            f"{worst:.1f} points (largest; last minus first: adherence {change['prompt_adherence']:+.1f}, actions "
            f"{change['action_following']:+.1f})", worst <= 3)
    teachers = {name: r for name, r in rows.items() if name.startswith("teacher 32 steps")}
    if four and teachers:  # against every >= 32-step teacher row (plain and guided): the largest shortfall
        keys = ("prompt_adherence", "action_following", "agent_found")
        gap, worst = max((teacher[k] - four[k], name) for name, teacher in teachers.items() for k in keys)
        row("4-step student within 3 points of the 32-step teacher", f"{gap:+.1f} points (largest shortfall, vs "
            f"{worst})", gap <= 3)
    if speed:
        fps = speed["throughput"][0]["fps_median"]
        first = speed["throughput"][0]
        row(">= 30 frames/s end to end at 128x128 (the default stream)", f"{fps:.1f} frames/s ({first['steps']} steps, "
            f"guidance {first.get('guidance', 1.0):g})", fps >= 30)
        row("time to first frame <= 0.5 s", f"{speed['cold']['first_frame_s']:.3f} s cold",
            speed["cold"]["first_frame_s"] <= 0.5)
        growth = speed["memory"]["growth_percent"]
        row("memory flat over 10,000 frames", f"{growth:+.2f}% RSS", abs(growth) < 2)
    return [*table, ""]


def _dit_shapes(path: Path) -> list[tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return [tuple(handle.get_slice(key).get_shape()) for key in handle.keys()]
