import numpy as np
import pytest
import torch

from framecast.models.config import DiTConfig
from framecast.models.dit import CausalWanDiT
from framecast.models.memory import KVCache
from framecast.models.world.latent_clips import LatentClips
from framecast.models.world.text_encoder import TextEncoderConfig, WorldTextEncoder
from framecast.models.loading import save_dit
from framecast.stream.worldmodel.student import (
    TARGET_SAMPLERS,
    GuidedTeacher, Rollout, StudentSettings, TrainingWindow, distillation_target, initial_student, pick_rollout_clips, rollout_loss, teacher_sample,
    teacher_target, warm_up,
)
from framecast.models.errors import ConfigError

TINY = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64, text_len=8, num_actions=5)


def tiny_dit(seed: int, dtype=torch.float64) -> CausalWanDiT:
    torch.manual_seed(seed)
    dit = CausalWanDiT(TINY)
    torch.nn.init.normal_(dit.action_embedding.weight, std=0.1)
    return dit.to(dtype).eval().requires_grad_(False)


def step(dit, memory, latents, timestep, text, actions):
    memory.begin_chunk(latents.shape[1])
    out = dit(latents, torch.full(actions.shape, float(timestep)), text, memory, actions)
    return out


def test_training_window_attends_like_the_engines_rolling_cache_through_rolls_and_a_recache():
    dit = tiny_dit(0)
    texts = [dit.encode_text(torch.randn(1, 5, 64, dtype=torch.float64)) for _ in range(2)]
    cache = KVCache(TINY, batch=1, tokens_per_frame=16, window_frames=12, sink_frames=0, evicts=True,
                    dtype=torch.float64)
    window = TrainingWindow(TINY.num_layers, 12, 16)
    history = []
    text = texts[0]
    for chunk in range(8):  # 24 frames: the 12-frame window rolls three times
        if chunk == 5:  # a prompt switch: both re-encode the frames they hold under the new prompt
            text = texts[1]
            for memory in (cache, window):
                frames = memory.begin_recache()
                latents = torch.cat([h[0] for h in history], 1)[:, frames.start:frames.stop]
                actions = torch.cat([h[1] for h in history], 1)[:, frames.start:frames.stop]
                dit(latents, torch.zeros(actions.shape), text, memory, actions)
                memory.commit()
        noisy = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
        actions = torch.randint(0, 5, (1, 3))
        flows = [step(dit, memory, noisy, 700, text, actions) for memory in (cache, window)]
        torch.testing.assert_close(flows[0], flows[1], rtol=0, atol=1e-10)
        clean = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
        for memory in (cache, window):
            step(dit, memory, clean, 0, text, actions)
            memory.commit()
        history.append((clean, actions))
    assert window.committed_frames == cache.committed_frames == 24


def test_teacher_target_is_the_euler_ode_of_the_teachers_flow():
    dit = tiny_dit(1)
    text = dit.encode_text(torch.randn(1, 5, 64, dtype=torch.float64))
    x = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
    actions = torch.zeros(1, 3, dtype=torch.long)
    one = teacher_target(dit, x, 1.0, text, TrainingWindow(2, 12, 16), actions, substeps=1)
    flow = step(dit, TrainingWindow(2, 12, 16), x, 1000, text, actions)
    torch.testing.assert_close(one, (x - flow).float(), rtol=0, atol=1e-6)  # one Euler step from sigma 1 lands on x0
    many = teacher_target(dit, x, 0.5, text, TrainingWindow(2, 12, 16), actions, substeps=8)
    assert many.shape == x.shape and torch.isfinite(many).all()


def test_teacher_sample_runs_the_teacher_as_the_engine_does_on_its_step_list():
    from framecast.stream.sampler import FlowMatchSchedule
    from framecast.stream.worldmodel.recipe import SHIFT, teacher_step_list

    dit = tiny_dit(1)
    text = dit.encode_text(torch.randn(1, 5, 64, dtype=torch.float64))
    x = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
    actions = torch.tensor([[1, 2, 3]])
    sample = teacher_sample(dit, x, 1.0, text, TrainingWindow(2, 12, 16), actions, 4, torch.Generator().manual_seed(3))
    # the engine's sampler by hand: clean estimate, fresh noise at the next sigma of the teacher's 4-step list
    generator, expected, noisy = torch.Generator().manual_seed(3), None, x
    for s in FlowMatchSchedule(SHIFT).steps(teacher_step_list(4)):
        expected = noisy - s.sigma * step(dit, TrainingWindow(2, 12, 16), noisy, s.timestep, text, actions)
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).double()
        noisy = (1 - s.next_sigma) * expected + s.next_sigma * noise
    torch.testing.assert_close(sample, expected.float(), rtol=0, atol=1e-5)
    # from a lower sigma only the steps below it run: from sigma 0.5 on a 4-step grid (1, .9, .75, .5) one step
    late = teacher_sample(dit, x, 0.5, text, TrainingWindow(2, 12, 16), actions, 4, torch.Generator().manual_seed(3))
    one = x - 0.5 * step(dit, TrainingWindow(2, 12, 16), x, 500, text, actions)
    torch.testing.assert_close(late, one.float(), rtol=0, atol=1e-5)


def test_the_agent_renoise_target_takes_the_teachers_sample_around_the_agent_and_the_ode_elsewhere():
    dit = tiny_dit(2)
    theirs = GuidedTeacher(dit)  # scale 1: the plain teacher
    theirs.text = dit.encode_text(torch.randn(1, 5, 64, dtype=torch.float64))
    x = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
    actions = torch.tensor([[0, 1, 4]])
    agent_at = torch.tensor([[[20.0, 20.0], [20.0, 20.0], [float("nan")] * 2]])  # not found in the last frame
    settings = StudentSettings(target_sampler="agent-renoise", teacher_substeps=4)
    target, xy = distillation_target(settings, theirs, x, 0.9, actions, torch.Generator().manual_seed(5),
                                     lambda latents: agent_at)
    sample = teacher_sample(dit, x, 0.9, theirs.text, TrainingWindow(2, 6, 16), actions, 4,
                            torch.Generator().manual_seed(5))
    ode = teacher_target(dit, x, 0.9, theirs.text, TrainingWindow(2, 6, 16), actions, 4)
    near = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    near[:, :2, 1:4, 1:4] = True  # latent pixels (8 px each) whose centres are within 13 px of (20, 20)
    torch.testing.assert_close(target, torch.where(near[:, :, None], sample, ode), rtol=0, atol=0)
    assert not torch.equal(sample[near[:, :, None].expand_as(sample)], ode[near[:, :, None].expand_as(ode)])
    assert xy is agent_at
    with pytest.raises(ConfigError, match="agent locator"):
        distillation_target(settings, theirs, x, 0.9, actions, torch.Generator(), None)
    with pytest.raises(ConfigError, match="target_sampler"):
        StudentSettings(target_sampler="dmd")


def test_the_agent_redraw_target_has_the_prompts_agent_where_the_teacher_drew_one():
    from framecast.models.world.autoencoder import frames_to_tensor, load_autoencoder
    from framecast.models.world.episodes import make_episode
    from framecast.models.world.ground_truth import read_agent
    from framecast.models.world.vocabulary import AgentShape
    from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, WEIGHTS_DIR
    from framecast.stream.worldmodel.student import AgentLocator

    autoencoder = load_autoencoder(WEIGHTS_DIR / AUTOENCODER_FILE)
    episode = make_episode(5, 3)
    shown = episode.settings[0]
    other = next(shape for shape in AgentShape if shape is not shown.agent_shape)
    wanted = shown.replace(agent_shape=other)
    with torch.no_grad():
        latents = autoencoder.encode(frames_to_tensor(episode.frames)[None])
    locator = AgentLocator(autoencoder)
    redrawn, xy = locator.redraw(latents, [wanted])
    assert redrawn.shape == latents.shape and xy.shape == (1, 3, 2)
    assert (xy[0] - torch.from_numpy(episode.agent_xy).float()).abs().max() < 1.0
    with torch.no_grad():
        frames = locator._frames(redrawn)[0]
    assert all(read_agent(frame).shape is other for frame in frames)
    # the teacher's sample goes through the redraw around the agent; the ODE elsewhere, as agent-renoise
    dit = tiny_dit(2, torch.float32)
    theirs = GuidedTeacher(dit)
    theirs.text = dit.encode_text(torch.randn(1, 5, 64))
    settings = StudentSettings(target_sampler="agent-redraw", teacher_substeps=2)
    x = torch.randn(1, 3, 16, 16, 16)
    calls = []

    class Recording(AgentLocator):
        def redraw(self, latents, wanted, at=None):
            calls.append(wanted)
            return torch.full_like(latents, 7.0), torch.tensor([[[20.0, 20.0]] * 3])

    target, xy = distillation_target(settings, theirs, x, 0.9, torch.zeros(1, 3, dtype=torch.long),
                                     torch.Generator().manual_seed(5), Recording(autoencoder), [wanted])
    assert calls == [[wanted]]
    near = torch.zeros(1, 3, 16, 16, dtype=torch.bool)
    near[:, :, 1:4, 1:4] = True
    assert (target[near[:, :, None].expand_as(target)] == 7.0).all()
    assert not (target[~near[:, :, None].expand_as(target)] == 7.0).any()
    with pytest.raises(ConfigError, match="wanted scene"):
        distillation_target(settings, theirs, x, 0.9, torch.zeros(1, 3, dtype=torch.long), torch.Generator(),
                            Recording(autoencoder), [])


def clips_with_switches(count: int = 12, frames: int = 24) -> LatentClips:
    from framecast.models.world.prompt import SceneSettings
    from framecast.models.world.text_encoder import settings_tokens
    from framecast.models.world.vocabulary import AgentShape, Terrain

    tokens = torch.tensor(settings_tokens(SceneSettings())).repeat(count, frames, 1)
    switched = SceneSettings(terrain=Terrain.SAND, agent_shape=AgentShape.DIAMOND)
    tokens[::2, 12:] = torch.tensor(settings_tokens(switched))  # every other clip switches at frame 12
    return LatentClips(torch.randn(count, frames, 16, 16, 16).bfloat16(), torch.randint(0, 5, (count, frames)),
                       tokens, torch.arange(count))


def test_the_agent_physics_target_draws_the_agent_where_the_world_takes_it_from_the_context():
    from framecast.models.world.autoencoder import frames_to_tensor, load_autoencoder
    from framecast.models.world.episodes import make_episode
    from framecast.models.world.ground_truth import read_agent
    from framecast.models.world.state import WorldConfig
    from framecast.models.world.world import agent_path
    from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, WEIGHTS_DIR
    from framecast.stream.worldmodel.student import AgentLocator

    autoencoder = load_autoencoder(WEIGHTS_DIR / AUTOENCODER_FILE)
    locator = AgentLocator(autoencoder)
    episode = make_episode(5, 9)
    with torch.no_grad():
        latents = autoencoder.encode(frames_to_tensor(episode.frames)[None])
    actions = torch.as_tensor(np.asarray(episode.actions))[None]
    # from the context chunk's last two frames (as read back from its latents) on with the next chunk's keys
    path = locator.path_on(latents[:, :3], actions[:, 3:6])
    seen = locator(latents[:, 1:3])[0]
    expected = agent_path(tuple(seen[0].tolist()), tuple(seen[1].tolist()), actions[0, 3:6].tolist(), WorldConfig())
    np.testing.assert_allclose(path[0].numpy(), expected, atol=1e-4)
    assert (path[0] - torch.from_numpy(episode.agent_xy[3:6]).float()).abs().max() < 1.5
    # the target: the teacher's agent (here the episode's own frames) redrawn at that path
    wanted = episode.settings[0]
    theirs = GuidedTeacher(tiny_dit(2, torch.float32))
    theirs.text = theirs.dit.encode_text(torch.randn(1, 5, 64))
    shifted = path + torch.tensor([3.0, -2.0])
    calls = []

    class Recording(AgentLocator):
        def redraw(self, sample, wanted, at=None):  # the teacher's sample: the episode's own next chunk
            calls.append(at)
            return super().redraw(latents[:, 3:6], wanted, at)

    settings = StudentSettings(target_sampler="agent-physics", teacher_substeps=2)
    target, xy = distillation_target(settings, theirs, latents[:, 3:6], 0.9, actions[:, 3:6],
                                     torch.Generator().manual_seed(5), Recording(autoencoder), [wanted], shifted)
    assert torch.equal(calls[0], shifted)
    assert (xy - shifted).abs().max() < 1e-4
    redrawn = locator._frames(Recording(autoencoder).redraw(None, [wanted], shifted)[0])[0]
    for frame, (x, y) in zip(redrawn, shifted[0].tolist()):
        assert abs(read_agent(frame).xy[0] - x) < 1.0 and abs(read_agent(frame).xy[1] - y) < 1.0
    # the plain redraw target ignores a path
    calls.clear()
    distillation_target(StudentSettings(target_sampler="agent-redraw", teacher_substeps=2), theirs,
                        latents[:, 3:6], 0.9, actions[:, 3:6], torch.Generator().manual_seed(5),
                        Recording(autoencoder), [wanted], shifted)
    assert calls == [None]


def test_rollout_clips_share_their_switch_chunk():
    clips = clips_with_switches()
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        index, switch = pick_rollout_clips(clips, 3, 8, rng)
        assert switch in (None, 4)
        assert all((int(i) % 2 == 0) == (switch == 4) for i in index)
        seen.add(switch)
    assert seen == {None, 4}


@pytest.mark.parametrize("target", TARGET_SAMPLERS)
def test_a_self_rollout_gives_a_finite_loss_and_gradients_on_every_layer(target):
    from framecast.models.world.autoencoder import load_autoencoder
    from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, WEIGHTS_DIR
    from framecast.stream.worldmodel.student import AgentLocator

    world_tiny = TINY
    teacher = tiny_dit(2, torch.float32)
    student = CausalWanDiT(world_tiny).train()
    student.load_state_dict(teacher.state_dict())
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=64)).requires_grad_(False)
    clips = clips_with_switches()
    # a 16x16 latent as the world model's; 2 chunks, one rollout
    settings = StudentSettings(batch=2, rollout_chunks=3, teacher_substeps=2, target_sampler=target)
    loss, steps = rollout_loss(student, teacher, text_encoder, clips, settings, np.random.default_rng(0),
                               torch.Generator().manual_seed(0), torch.device("cpu"),
                               AgentLocator(load_autoencoder(WEIGHTS_DIR / AUTOENCODER_FILE)))
    assert np.isfinite(loss) and loss > 0 and steps in (1, 2, 4)
    for block in student.blocks:
        assert block.self_attn.q.weight.grad is not None and block.self_attn.q.weight.grad.abs().sum() > 0


def test_a_warm_up_streams_the_student_alone_and_leaves_both_windows_on_its_chunks():
    from framecast.stream.sampler import FlowMatchSchedule
    from framecast.stream.worldmodel.recipe import SHIFT, STUDENT_STEPS

    teacher, student = tiny_dit(2, torch.float32), tiny_dit(3, torch.float32)
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=64)).requires_grad_(False)
    clips = clips_with_switches()
    mine, theirs = Rollout(student), GuidedTeacher(teacher, 1.5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    # 10 chunks = 30 frames: more held keys than one 24-frame clip has
    warm_up(student, mine, theirs, clips, 10, clips.tokens[[1, 2], 0], text_encoder,
            FlowMatchSchedule(SHIFT).steps(STUDENT_STEPS[2]), np.random.default_rng(0), torch.Generator().manual_seed(0),
            autocast)
    for side in (mine, theirs, theirs.null):
        assert side.memory.committed_frames == 30
        assert [h[0].shape for h in side.history] == [(2, 3, 16, 16, 16)] * 2
    for (ours, keys), (their, their_keys) in zip(mine.history, theirs.history):
        assert torch.equal(ours, their) and torch.equal(keys, their_keys)
    assert torch.isfinite(mine.history[-1][0]).all() and mine.history[-1][0].std() > 0
    with torch.no_grad():  # the student streamed under the warm-up's prompt
        expected = student.encode_text(text_encoder(clips.tokens[[1, 2], 0]))
    assert all(torch.equal(a, b) for a, b in zip(mine.text.keys, expected.keys))


def test_a_rollout_after_a_warm_up_still_trains_every_layer():
    teacher = tiny_dit(2, torch.float32)
    student = CausalWanDiT(TINY).train()
    student.load_state_dict(teacher.state_dict())
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=64)).requires_grad_(False)
    settings = StudentSettings(batch=2, rollout_chunks=2, teacher_substeps=2, target_sampler="ode", warmup_chunks=3)
    rng = np.random.default_rng(1)
    for _ in range(3):  # warm-ups of several lengths, with and without a switch after them
        student.zero_grad()
        loss, _ = rollout_loss(student, teacher, text_encoder, clips_with_switches(), settings, rng,
                               torch.Generator().manual_seed(0), torch.device("cpu"))
        assert np.isfinite(loss) and loss > 0
        assert all(block.self_attn.q.weight.grad.abs().sum() > 0 for block in student.blocks)


def test_student_settings_refuse_bad_values():
    with pytest.raises(ConfigError, match="warmup_chunks"):
        StudentSettings(warmup_chunks=-1)
    with pytest.raises(ConfigError, match="batch"):
        StudentSettings(batch=0)
    with pytest.raises(ConfigError, match="step_weights"):
        StudentSettings(step_weights=(0.0, 0.0, 0.0))


def test_the_agent_locator_finds_the_agent_in_encoded_frames():
    from framecast.models.world.autoencoder import frames_to_tensor, load_autoencoder
    from framecast.models.world.episodes import make_episode
    from framecast.stream.worldmodel.recipe import AUTOENCODER_FILE, WEIGHTS_DIR
    from framecast.stream.worldmodel.student import AgentLocator

    autoencoder = load_autoencoder(WEIGHTS_DIR / AUTOENCODER_FILE)
    episode = make_episode(5, 3)
    with torch.no_grad():
        latents = autoencoder.encode(frames_to_tensor(episode.frames)[None])
    xy = AgentLocator(autoencoder)(latents)
    assert xy.shape == (1, 3, 2)
    assert (xy[0] - torch.from_numpy(episode.agent_xy).float()).abs().max() < 1.0
    nothing = AgentLocator(autoencoder)(torch.zeros(1, 3, 16, 16, 16))  # a flat frame: no agent, NaN
    assert torch.isnan(nothing).all()


def test_a_rebased_student_starts_from_the_earlier_student_plus_the_teachers_change(tmp_path):
    paths = {}
    for seed, name in enumerate(("old_teacher", "student", "new_teacher")):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_dit(tiny_dit(seed, torch.float32), paths[name])
    weights = {name: tiny_dit(seed, torch.float32).state_dict() for seed, name in enumerate(paths)}
    plain = initial_student(paths["new_teacher"], paths["student"], None)
    rebased = initial_student(paths["new_teacher"], paths["student"], paths["old_teacher"])
    for key, value in weights["student"].items():
        assert torch.equal(plain[key], value)
        expected = value + weights["new_teacher"][key] - weights["old_teacher"][key]
        torch.testing.assert_close(rebased[key], expected, rtol=0, atol=1e-6)
    assert any(not torch.equal(rebased[k], plain[k]) for k in plain)

    other = tmp_path / "other.safetensors"
    torch.manual_seed(9)
    save_dit(CausalWanDiT(DiTConfig(dim=64, ffn_dim=256, num_heads=2, num_layers=2, text_dim=64, text_len=8,
                                    num_actions=5)), other)
    with pytest.raises(ConfigError, match="not the same DiT"):
        initial_student(paths["new_teacher"], paths["student"], other)


def test_guided_teacher_is_null_plus_scale_times_prompt_minus_null_each_with_its_own_context():
    from framecast.stream.worldmodel.teacher import null_text

    dit = tiny_dit(4)
    prompt = torch.randn(1, 5, 64, dtype=torch.float64)
    guided, plain = GuidedTeacher(dit, 3.0), GuidedTeacher(dit, 1.0)
    by_hand = {name: Rollout(dit) for name in ("prompt", "null")}
    for rollout in (guided, plain):
        rollout.set_prompt(prompt, recache=False)
    by_hand["prompt"].set_prompt(prompt, recache=False)
    by_hand["null"].set_prompt(null_text(prompt), recache=False)
    actions = torch.tensor([[0, 3, 4]])
    for chunk in range(3):  # context builds up in both windows; a switch at chunk 2 recaches both
        if chunk == 2:
            prompt = torch.randn(1, 5, 64, dtype=torch.float64)
            for rollout in (guided, plain):
                rollout.set_prompt(prompt, recache=True)
            by_hand["prompt"].set_prompt(prompt, recache=True)
            by_hand["null"].set_prompt(null_text(prompt), recache=True)
        x = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
        flows = {name: step(dit, r.memory, x, 600, r.text, actions) for name, r in by_hand.items()}
        guided.memory.begin_chunk(3)
        torch.testing.assert_close(guided(x, torch.full((1, 3), 600.0), guided.text, guided.memory, actions),
                                   flows["null"] + 3.0 * (flows["prompt"] - flows["null"]), rtol=0, atol=1e-10)
        plain.memory.begin_chunk(3)
        torch.testing.assert_close(plain(x, torch.full((1, 3), 600.0), plain.text, plain.memory, actions),
                                   flows["prompt"], rtol=0, atol=0)
        assert not torch.allclose(flows["null"], flows["prompt"])
        clean = torch.randn(1, 3, 16, 8, 8, dtype=torch.float64)
        for rollout in (guided, plain, *by_hand.values()):
            rollout.commit(clean, actions)
    assert guided.null.memory.committed_frames == guided.memory.committed_frames == 9
    with pytest.raises(ConfigError, match="guidance"):
        StudentSettings(guidance=0.5)
