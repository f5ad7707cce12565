"""ADM-AT on class-conditional ImageNet 64x64 (settings partly inferred; docs/method.md,
"Hyper-parameters" and "What is inferred").

The standard ADM ImageNet-64 architecture (192 channels, 3 res blocks, 64 channels per head,
attention at 32/16/8, dropout 0.1, learned sigma, cosine), fine-tuned with fast AT from the public
`64x64_diffusion.pt` (an EMA checkpoint: pass it as both init.checkpoint and init.ema_checkpoint).
Data: TFDS `downsampled_imagenet/64x64` as array_record, with labels (see README, "Datasets").
"""
import pathlib
import runpy

_DEFAULT = runpy.run_path(str(pathlib.Path(__file__).with_name("default.py")))


def get_config():
    c = _DEFAULT["get_config"]()
    c.data.dataset = "downsampled_imagenet/64x64"
    c.data.random_flip = True
    m = c.model
    m.image_size, m.in_channels = 64, 3
    m.num_channels = 192
    m.channel_mult = ""             # guided-diffusion's default for 64 px: 1,2,3,4
    m.num_res_blocks = 3
    m.attention_resolutions = "32,16,8"
    m.num_head_channels = 64
    m.resblock_updown = True
    m.use_new_attention_order = True
    m.use_scale_shift_norm = True
    m.dropout = 0.1
    m.learn_sigma = True
    m.class_cond = True
    m.num_classes = 1000
    m.dtype = "bfloat16"
    g = c.diffusion
    g.steps, g.noise_schedule = 1000, "cosine"
    g.rescale_learned_sigmas = True
    g.schedule_sampler = "loss-second-moment"
    a = c.adv
    a.kind, a.steps, a.step_size, a.max_norm, a.target_type = "fast", 3, 0.1, 0.1, "delta_detach"
    c.optim.lr = 1e-4
    t = c.train
    t.global_batch_size = 256       # [?] not published; ADM used 2048 for pre-training
    t.num_minibatches = 100_000     # [?]
    t.ema_rates = (0.9999,)
    t.checkpoint_every = 5_000
    t.sample_every = 10_000
    c.mesh.fsdp = 1
    return c
