"""The published Stable Diffusion UNet configs map to diffax UNets of exactly their published sizes: SD 1.5
(859,520,964 parameters: 8 heads at every level, conv projections, 768-wide CLIP states) and SD 2.1 (865,910,724:
heads of 64 channels, linear projections, 1024-wide OpenCLIP states). Built from shapes only (nothing allocated).
"""
import ml_collections
import pytest
from flax import nnx

from diffax.models import build_model, count_params
from diffax.models.diffusers_sd import cond_unet_config_to_diffax

SD15 = dict(_class_name="UNet2DConditionModel", act_fn="silu", attention_head_dim=8,
            block_out_channels=[320, 640, 1280, 1280], center_input_sample=False, cross_attention_dim=768,
            down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
            flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2, mid_block_scale_factor=1,
            norm_eps=1e-05, norm_num_groups=32, out_channels=4, sample_size=64,
            up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD21 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
            use_linear_projection=True, upcast_attention=True, dual_cross_attention=False, num_class_embeds=None,
            only_cross_attention=False, resnet_time_scale_shift="default", class_embed_type=None)


@pytest.mark.parametrize("cfg,params,heads", [(SD15, 859_520_964, (8, -1)),
                                               pytest.param(SD21, 865_910_724, (1, 64), marks=pytest.mark.slow)])
def test_published_configs_have_published_sizes(cfg, params, heads):
    model_fields, context_dim, data = cond_unet_config_to_diffax(cfg)
    assert (model_fields["num_heads"], model_fields["head_channels"]) == heads
    assert model_fields["attention_resolutions"] == tuple(cfg["sample_size"] >> i for i in range(3))
    shape = (data["image_size"], data["image_size"], data["channels"])
    model = nnx.eval_shape(lambda: build_model(ml_collections.ConfigDict(model_fields), data_shape=shape,
                                               num_classes=0, rngs=nnx.Rngs(0), context_dim=context_dim))
    assert count_params(model) == params
