"""The model side of the paper, in copy order: each section needs only those above it.

  1. ViT        sin-cos table, attention, blocks, ViT, named sizes (torch only: lines 1 to the end of
                MODELS are a working ViT on their own)
  2. MAE        patches, masking, the pixel loss, the decoder, MAE
  3. DS-MAE     the EMA teacher, its targets and the feature loss, DSMAE
  4. encoders   what the stages share to evaluate and load one: k-NN, accuracy, features, checkpoints
  5. ResNets    torchvision backbones (curriculum.py) and the classifiers cam.py loads
  6. training   the no-weight-decay rule, device and precision, the CPU allocator, preemption

Parameter names follow timm's VisionTransformer (patch_embed.proj, cls_token, pos_embed, blocks.N.attn.qkv,
blocks.N.mlp.fc1, norm, head): an encoder trained here loads into timm.create_model("vit_tiny_patch16_224", ...).
Shapes: B batch, N patches, M selected patches (masked or noised), D width, P = p*p*C pixels per patch.
"""
import contextlib
import copy
import math
import os
import signal
import tempfile

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ============================================================ 1. ViT

def sincos_pos_embed(dim, grid_h, grid_w, cls_token=True):
    """Fixed 2-D sine-cosine positional embedding (1, [1 +] grid_h * grid_w, dim): half of the channels encode the
    row, half the column; the class token gets zeros."""
    assert dim % 4 == 0, f"embedding width {dim} must be divisible by 4 for 2-D sin-cos"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    parts = []
    for pos in (rows.flatten(), cols.flatten()):
        angle = pos[:, None] * omega[None, :]                    # (N, dim/4)
        parts += [angle.sin(), angle.cos()]
    emb = torch.cat(parts, dim=1)                                # (N, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)


def attention(q, k, v, return_weights=False):
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) inputs: the fused kernel, except where the weights are wanted
    (attention maps) or in bf16 on a CPU, where torch's fused kernel is slow (its bf16 backward ~4x its fp32 one) and
    two bf16 matmuls around a softmax made DS-MAE steps 1.4-3x faster (docs/speed.md); quadratic memory in N."""
    if return_weights or (q.device.type == "cpu" and q.dtype == torch.bfloat16):
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)   # (B, heads, N, N)
        return (attn @ v, attn) if return_weights else attn @ v
    return F.scaled_dot_product_attention(q, k, v)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch for a random subset of the batch."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        assert dim % num_heads == 0, f"width {dim} not divisible by {num_heads} heads"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)        # one matmul for q, k and v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention=False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, return_attention)                # (B, heads, N, D/heads)[, weights]
        out, attn = out if return_attention else (out, None)
        out = self.proj(out.transpose(1, 2).reshape(B, N, D))
        return (out, attn) if return_attention else out


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x, return_attention=False):
        if return_attention:                                      # evaluation only: no drop path
            y, attn = self.attn(self.norm1(x), return_attention=True)
            x = x + y
            return x + self.mlp(self.norm2(x)), attn
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)            # (B, N, D)


def init_weights(module):
    """MAE's initialisation: xavier-uniform linears (the patch projection seen as one), zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViT(nn.Module):
    """Vision Transformer encoder with a class token and a fixed sin-cos positional embedding. forward_features(x)
    -> (B, 1 + N, D) normalised tokens; forward(x) -> head(pooled tokens). embed() and encode() are the two halves
    of forward_features, so that MAE can drop tokens between them."""

    def __init__(self, *, img_size, patch_size, embed_dim, depth, num_heads, in_chans=3,
                 mlp_ratio=4.0, drop_path=0.0, num_classes=0, global_pool="token"):
        super().__init__()
        assert img_size % patch_size == 0, f"image size {img_size} not divisible by patch size {patch_size}"
        assert global_pool in ("token", "avg")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.grid = img_size // patch_size
        self.global_pool = global_pool
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, self.grid, self.grid))
        dpr = torch.linspace(0, drop_path, depth).tolist()           # deeper blocks drop more
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, dpr[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)

    def config(self):
        """The keyword arguments that rebuild this architecture (stored in checkpoints)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                    embed_dim=self.embed_dim, depth=self.depth, num_heads=self.num_heads)

    def embed(self, x):
        """(B, C, H, W) images -> (B, N, D) patch tokens with their positions added."""
        if tuple(x.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"this ViT takes ({self.in_chans}, {self.img_size}, {self.img_size}) images, got "
                             f"{tuple(x.shape[1:])}: resize them, or rebuild it (models.load_encoder(img_size=...))")
        return self.patch_embed(x) + self.pos_embed[:, 1:]

    def with_cls(self, tokens):
        """Prepend the class token (with its position) to (B, n, D) tokens."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1)

    def encode(self, tokens, keep=0):
        """(B, n, D) position-embedded tokens (all or a subset) -> (B, 1 + n, D) normalised tokens.
        keep=K also returns the raw outputs of the last K blocks, a list of (B, 1 + n, D)."""
        x, hidden = self.with_cls(tokens), []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= self.depth - keep:
                hidden.append(x)
        return (self.norm(x), hidden) if keep else self.norm(x)

    def forward_features(self, x):
        return self.encode(self.embed(x))

    def pool(self, z, how=None):
        """Class token ('token') or mean of the patch tokens ('avg') of (B, 1 + N, D) tokens."""
        return z[:, 0] if (how or self.global_pool) == "token" else z[:, 1:].mean(dim=1)

    def forward(self, x):
        return self.head(self.pool(self.forward_features(x)))

    @torch.no_grad()
    def get_last_selfattention(self, x):
        """Attention of the last block, (B, heads, 1 + N, 1 + N), through the explicit path."""
        x = self.with_cls(self.embed(x))
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True)[1]


MODELS = {
    "vit_nano": dict(embed_dim=32, depth=2, num_heads=2),       # tests
    "vit_micro": dict(embed_dim=96, depth=6, num_heads=3),      # CPU labs: learns in minutes
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
}


# ============================================================ 2. MAE

def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (row, col, channel)."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x, p, h, w):
    """(B, N, p*p*C) -> (B, C, h*p, w*p); the inverse of patchify."""
    B, N, P = x.shape
    C = P // (p * p)
    x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, C, h * p, w * p)


def gather_tokens(x, idx):
    """Pick tokens per image: x (B, N, D), idx (B, M) -> (B, M, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def random_subset(B, N, M, device):
    """M of N indices per row, uniformly without replacement: (chosen (B, M), rest (B, N - M))."""
    order = torch.rand(B, N, device=device).argsort(dim=1)
    return order[:, :M], order[:, M:]


def patch_mask_to_pixels(idx, grid, p, B, device):
    """(B, M) patch indices -> (B, 1, grid*p, grid*p) float mask, 1 on the selected patches."""
    m = torch.zeros(B, grid * grid, device=device).scatter_(1, idx, 1.0)
    m = m.view(B, 1, grid, 1, grid, 1).expand(-1, -1, -1, p, -1, p)
    return m.reshape(B, 1, grid * p, grid * p)


def pixel_loss(pred, target, norm_pix=False):
    """MSE between predicted and true patches (B, M, P); norm_pix: MAE's target, each patch normalised by itself."""
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    return (pred.float() - target).pow(2).mean()


class Decoder(nn.Module):
    """Narrow transformer from encoder tokens to pixels: project, add positions, blocks (heads 32 wide, as MAE's)."""

    def __init__(self, encoder_dim, grid, patch_pixels, dim=256, depth=4):
        super().__init__()
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed(dim, grid, grid))
        heads = next(h for h in range(max(dim // 32, 1), 0, -1) if dim % h == 0)    # 32 wide, or as near as divides
        self.decoder_blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, patch_pixels)
        init_weights(self)

    def forward(self, x, pos=None):
        """x (B, n, dim) projected tokens; pos (B, n) patch indices, or None for the class token and every patch."""
        if pos is None:
            x = x + self.decoder_pos_embed
        else:
            x = x + gather_tokens(self.decoder_pos_embed[:, 1:].expand(x.shape[0], -1, -1), pos)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))


class MAE(nn.Module):
    """Masked autoencoder (He et al. 2022): encode a random (1 - mask_ratio) of the patches, decode all of them with
    mask tokens in the gaps, MSE on the masked ones (per-patch normalised pixels unless norm_pix=False)."""

    def __init__(self, encoder, *, decoder_dim=256, decoder_depth=4, mask_ratio=0.75, norm_pix=True):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix = mask_ratio, norm_pix
        p, grid = encoder.patch_size, encoder.grid
        self.num_masked = int(round(mask_ratio * grid * grid))
        assert 0 < self.num_masked < grid * grid, f"mask ratio {mask_ratio} leaves nothing to encode or to predict"
        self.decoder = Decoder(encoder.embed_dim, grid, p * p * encoder.in_chans, decoder_dim, decoder_depth)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs):
        ## MAE in three lines: hide most patches, encode only the visible ones, and ask a small
        ## decoder to paint the hidden ones back. With 75% hidden, neighbouring pixels are rarely
        ## visible, so copying fails: the encoder has to represent what the object is.
        enc, B = self.encoder, imgs.shape[0]
        N = enc.grid ** 2
        masked, visible = random_subset(B, N, self.num_masked, imgs.device)
        ## the encoder never sees a mask token: 4x fewer tokens, so pretraining is ~3x cheaper
        z = enc.encode(gather_tokens(enc.embed(imgs), visible))            # (B, 1 + N - M, D)

        # put the encoded tokens back in place, mask tokens everywhere else
        x = self.decoder.decoder_embed(z)
        Dd = x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(B, N, Dd).scatter(
            1, visible.unsqueeze(-1).expand(-1, -1, Dd), x[:, 1:])
        pred = self.decoder(torch.cat([x[:, :1], full], dim=1))[:, 1:]     # (B, N, P)
        pred = gather_tokens(pred, masked)                                 # (B, M, P)
        target = gather_tokens(patchify(imgs, enc.patch_size), masked)
        loss = pixel_loss(pred, target, self.norm_pix)
        corrupted = imgs * (1 - patch_mask_to_pixels(masked, enc.grid, enc.patch_size, B, imgs.device))
        return loss, dict(loss_y=loss.detach(), pred=pred.detach(), idx=masked, input=corrupted)


# ============================================================ 3. DS-MAE

class EMA(nn.Module):
    """Exponential moving average of a module, theta_ema <- m * theta_ema + (1 - m) * theta: the DS-MAE teacher.
    It never takes gradients and always runs in eval mode (no drop path); one multi-tensor lerp per update."""

    def __init__(self, model):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def update(self, model, momentum):
        ## the teacher is a slow average of the student: with momentum 0.99 it moves 1% of the way
        ## each step, so its outputs change smoothly and give the student a stable target; it is
        ## never trained by a gradient, and a collapsed (constant) target cannot appear at once
        torch._foreach_lerp_(list(self.module.parameters()), list(model.parameters()), 1.0 - momentum)
        if buffers := list(self.module.buffers()):
            torch._foreach_copy_(buffers, list(model.buffers()))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ema_momentum(step, total_steps, start=0.96, end=0.99, batch=None, ref_batch=None):
    """Cosine schedule of the EMA momentum, start at step 0 to end at total_steps. With ref_batch, m set for
    ref_batch becomes m ** (batch / ref_batch): the same lag in images whatever the batch (0.99 at 2048 is
    0.99937 at 128)."""
    t = min(step / max(total_steps, 1), 1.0)
    m = end - (end - start) * (math.cos(math.pi * t) + 1) / 2
    return m ** (batch / ref_batch) if batch and ref_batch else m


def cosine_loss(pred, target, per_token=False):
    """1 - cos(pred, target) for (B, M, D) tokens, averaged over images: Eq. 2 as written, one cosine per image over
    its M tokens' concatenated features; per_token=True: the mean of M token-wise cosines."""
    pred, target = pred.float(), target.float()
    if per_token:
        return 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    return 1 - F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=-1).mean()


TEACHER_TARGETS = ("final", "center", "ln", "avg")


def teacher_target(z, hidden, how="final"):
    """The tokens the DS-MAE regressor predicts, from the teacher's patch tokens: z (B, N, D) its
    normalised output, hidden the raw outputs of its last K blocks, each (B, N, D).

      final   z itself (the paper: "the teacher's output")
      center  z minus its mean over batch and positions: without the part every token shares, which Eq. 2's
              single cosine over all tokens otherwise matches for free
      ln      the last block's output, LayerNorm'd per token without affine parameters
      avg     data2vec's: each of the K blocks' outputs instance-normalised over its image's tokens, averaged"""
    if how == "final":
        return z
    if how == "center":
        return z - z.mean(dim=(0, 1), keepdim=True)
    if how == "ln":
        return F.layer_norm(hidden[-1].float(), hidden[-1].shape[-1:], eps=1e-6)
    if how == "avg":
        return sum(F.instance_norm(h.float().transpose(1, 2), eps=1e-6).transpose(1, 2) for h in hidden) / len(hidden)
    raise ValueError(f"unknown teacher target {how!r}; choose from {', '.join(TEACHER_TARGETS)}")


class DSMAE(nn.Module):
    """Denoising self-distillation masked autoencoder (Xu & Stirenko 2023). The student encoder sees every patch,
    with Gaussian noise on a random noise_ratio of them. Only the noised patches' tokens go on, to
      - the decoder, which predicts their clean pixels (L_y, Eq. 1; per-patch normalised unless norm_pix=False), and
      - the regressor (2 blocks), which predicts the tokens an EMA teacher computes from the clean image at the
        same patches (L_z, Eq. 2; which tokens: teacher_target).
    L = lam * L_y + (1 - lam) * L_z; at lam 1 (or 0) the teacher and regressor (or the decoder) are not built.
    decoder_input="regressor" chains the branches (the paper's Fig. 1 text; CAE's layout): the decoder reads the
    regressor's predicted teacher tokens instead of the student's."""

    def __init__(self, encoder, *, decoder_dim=256, decoder_depth=4, regressor_depth=2,
                 noise_ratio=0.9, noise_std=1.0, noise_mode="add", lam=0.6, norm_pix=True,
                 per_token_cos=False, target="final", target_blocks=1, decoder_input="encoder"):
        super().__init__()
        assert 0.0 <= lam <= 1.0 and noise_mode in ("add", "replace") and target in TEACHER_TARGETS
        assert decoder_input == "encoder" or 0 < lam < 1, "decoder_input='regressor' needs both branches"
        assert 1 <= target_blocks <= encoder.depth, f"target_blocks {target_blocks} not in 1..{encoder.depth}"
        self.encoder, self.decoder_input, self.lam, self.noise_std, self.noise_mode = \
            encoder, decoder_input, lam, noise_std, noise_mode
        self.norm_pix, self.per_token_cos = norm_pix, per_token_cos
        self.target, self.target_blocks = target, target_blocks
        p, grid = encoder.patch_size, encoder.grid
        self.num_noised = int(round(noise_ratio * grid * grid))
        assert self.num_noised > 0, f"noise ratio {noise_ratio} noises no patch"
        self.decoder = self.teacher = self.regressor = None
        if lam > 0:
            self.decoder = Decoder(encoder.embed_dim, grid, p * p * encoder.in_chans, decoder_dim, decoder_depth)
        if lam < 1:
            self.teacher, D = EMA(encoder), encoder.embed_dim
            self.regressor = nn.Sequential(*[Block(D, encoder.num_heads) for _ in range(regressor_depth)],
                                           nn.LayerNorm(D, eps=1e-6))
            init_weights(self.regressor)

    def add_noise(self, imgs, idx):
        """Noise on the patches idx (B, M) of imgs (B, C, H, W); other pixels stay bit-identical."""
        enc, eps = self.encoder, torch.randn_like(imgs)
        m = patch_mask_to_pixels(idx, enc.grid, enc.patch_size, imgs.shape[0], imgs.device).bool()
        noisy = eps if self.noise_mode == "replace" else imgs + self.noise_std * eps
        return torch.where(m, noisy, imgs)

    def forward(self, imgs):
        ## DS-MAE: corrupt most patches with noise (the student still sees every patch), then
        ## learn twice from the same student tokens: the decoder restores the clean pixels (local
        ## detail), the regressor predicts what the teacher sees on the clean image (context).
        enc, B = self.encoder, imgs.shape[0]
        idx, _ = random_subset(B, enc.grid ** 2, self.num_noised, imgs.device)
        noisy = self.add_noise(imgs, idx)
        zn = gather_tokens(enc.forward_features(noisy)[:, 1:], idx)        # (B, M, D) student
        parts = dict(idx=idx, input=noisy)
        loss_y = loss_z = 0.0
        zr = self.regressor(zn) if self.regressor is not None else None    # (B, M, D) predicted teacher tokens
        if self.decoder is not None:
            zd = zr if self.decoder_input == "regressor" else zn
            pred = self.decoder(self.decoder.decoder_embed(zd), pos=idx)     # (B, M, P)
            target = gather_tokens(patchify(imgs, enc.patch_size), idx)
            loss_y = pixel_loss(pred, target, self.norm_pix)
            parts.update(loss_y=loss_y.detach(), pred=pred.detach())
        if self.teacher is not None:
            ## no gradient into the teacher: the target is fixed for this step, as in BYOL and data2vec
            with torch.no_grad():
                t = self.teacher.module
                z, hidden = t.encode(t.embed(imgs), keep=self.target_blocks)
                zt = teacher_target(z[:, 1:], [h[:, 1:] for h in hidden], self.target)
                zt = gather_tokens(zt, idx)                                  # (B, M, D)
            loss_z = cosine_loss(zr, zt, self.per_token_cos)
            parts.update(loss_z=loss_z.detach())
        loss = self.lam * loss_y + (1 - self.lam) * loss_z
        return loss, parts

    def update_teacher(self, momentum):
        if self.teacher is not None:
            self.teacher.update(self.encoder, momentum)


# ============================================================ 4. encoders: evaluate, save, load

@torch.no_grad()
def knn_predict(train_feats, train_labels, test_feats, num_classes, k=20, T=0.07, chunk=512):
    """Weighted k-NN on cosine similarity (DINO): each of the k nearest training samples votes for its class with
    weight exp(similarity / T). Returns (n_test,) predicted labels."""
    ## no training at all: a test image takes the label its nearest training images vote for.
    ## If images of a class sit close together in feature space, the features already "know" the
    ## class: the cheapest test of a representation, run during pretraining as a monitor
    assert train_labels is not None and (train_labels >= 0).all(), "k-NN needs labelled training features"
    train, test = F.normalize(train_feats.float(), dim=1), F.normalize(test_feats.float(), dim=1)
    k, preds = min(k, train.shape[0]), []
    for i in range(0, test.shape[0], chunk):
        sim, nn_idx = (test[i:i + chunk] @ train.T).topk(k, dim=1)           # (n, k)
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, train_labels[nn_idx], (sim / T).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def per_class_accuracy(pred, y, num_classes):
    """(num_classes,) fraction of each class's samples predicted right (nan for absent classes)."""
    hit = torch.zeros(num_classes, device=y.device).index_add_(0, y, (pred == y).float())
    count = torch.bincount(y, minlength=num_classes).float()
    return hit / count


@torch.no_grad()
def evaluate(model, images, labels, transform, num_classes, amp=None, batch_size=256):
    """Top-1, mean per-class and per-class accuracy (%) of a classifier on uint8 images (n, C, H, W) put through
    transform (uint8 batch on the model's device -> normalised float batch)."""
    was_training, device, preds = model.training, next(model.parameters()).device, []
    model.eval()
    for i in range(0, len(images), batch_size):
        with amp or contextlib.nullcontext():
            preds.append(model(transform(images[i:i + batch_size].to(device))).argmax(dim=1))
    model.train(was_training)
    pred, y = torch.cat(preds), labels.to(device)
    per_class = per_class_accuracy(pred, y, num_classes) * 100
    return dict(top1=(pred == y).float().mean().item() * 100, mean_per_class=per_class.nanmean().item(),
                per_class=[round(v, 2) for v in per_class.tolist()])


@torch.no_grad()
def extract_features(encoder, images, transform, batch_size=256, device="cpu", amp=None):
    """Class token and mean of the patch tokens, (n, D) each, for uint8 images (n, C, H, W) put through transform
    (uint8 batch on device -> normalised float batch), in eval mode."""
    was_training, cls, avg = encoder.training, [], []
    encoder.eval()
    for i in range(0, len(images), batch_size):
        with amp or contextlib.nullcontext():
            z = encoder.forward_features(transform(images[i:i + batch_size].to(device)))
        cls.append(z[:, 0].float())
        avg.append(z[:, 1:].float().mean(dim=1))
    encoder.train(was_training)
    return torch.cat(cls), torch.cat(avg)


def read_checkpoint(path, what="checkpoint"):
    """torch.load(weights_only=True) of a checkpoint this project wrote; ValueError naming the file when it cannot."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable {what} (truncated or another kind of file: "
                         f"{type(e).__name__}); point to the ckpt.pt or best.pt a script wrote") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a {what} of this project (no dict inside)")
    return ckpt


def save_checkpoint(state, path):
    """Atomic: written to path.tmp, then renamed over path, so a crash while writing leaves the previous checkpoint
    intact. A failed write (a full disk) removes the temporary file and stops with one line saying what is left."""
    import shutil
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:              # torch's zip writer reports a full disk as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(tmp)
        why = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20
        kept = f"the previous {path} is intact" if os.path.exists(path) else f"there was no earlier {path}"
        raise SystemExit(f"error: could not write {path} ({why}; {free:.0f} MiB free on its disk); {kept}. Free "
                         f"some space or choose another --output-dir, then rerun the command") from None


def load_encoder(path=None, key="auto", *, model=None, img_size=None, patch_size=None, in_chans=None,
                 drop_path=0.0, num_classes=0, global_pool="token"):
    """The ViT to evaluate: from a pretrain.py checkpoint (key teacher: the EMA encoder; student; auto: the
    teacher where there is one), or MODELS[model] at random initialisation when path is None (the scratch
    baseline). Arguments left None come from the checkpoint and given ones must agree with it, except a new
    image size, for which the sin-cos positional table is rebuilt, with a warning."""
    import warnings
    if path is None:
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {patch_size}")
        return ViT(img_size=img_size, patch_size=patch_size, in_chans=in_chans or 3, drop_path=drop_path,
                   num_classes=num_classes, global_pool=global_pool, **MODELS[model])
    ckpt = read_checkpoint(path, "pretrain.py checkpoint")
    if "encoder_config" not in ckpt:
        raise ValueError(f"{path} is not a pretrain.py checkpoint (no encoder_config)")
    cfg = dict(ckpt["encoder_config"])
    dims = {k: cfg[k] for k in ("embed_dim", "depth", "num_heads")}
    if model is not None and MODELS[model] != dims:
        raise ValueError(f"{path} holds a {dims} encoder, not {model} {MODELS[model]}")
    for name, value in (("patch_size", patch_size), ("in_chans", in_chans)):
        if value is not None and value != cfg[name]:
            raise ValueError(f"{path} was pretrained with {name} {cfg[name]}, not {value}")
    key = ("teacher" if "teacher" in ckpt else "student") if key == "auto" else key
    state = ckpt.get("encoder" if key == "student" else "teacher")
    if state is None:
        raise ValueError(f"{path} has no {key} encoder (MAE checkpoints have only the student)")
    grid_old = cfg["img_size"] // cfg["patch_size"]
    cfg["img_size"] = img_size or cfg["img_size"]
    if cfg["img_size"] % cfg["patch_size"]:
        raise ValueError(f"image size {cfg['img_size']} is not divisible by the patch size {cfg['patch_size']} of "
                         f"{path}")
    enc, state = ViT(**cfg, drop_path=drop_path, global_pool=global_pool), dict(state)
    if enc.grid != grid_old:                                     # the fixed sin-cos table, rebuilt for the new grid
        warnings.warn(f"positional embedding: grid {grid_old}x{grid_old} in {path}, {enc.grid}x{enc.grid} here")
        state["pos_embed"] = enc.pos_embed.clone()
    enc.load_state_dict(state)                                   # strict: a mismatch fails loudly
    if num_classes:
        enc.head = nn.Linear(enc.embed_dim, num_classes)
    return enc


# ============================================================ 5. ResNets and classifiers

RESNETS = ("resnet18", "resnet34", "resnet50")


def build_resnet(arch, in_chans=3, img_size=32):
    """torchvision ResNet (random init) whose forward returns the pooled (B, out_dim) features (fc is Identity;
    a classifier sets fc = Linear(out_dim, classes)). At img_size <= 64 CIFAR's stem (3x3 conv, stride 1, no
    max-pool), so a 32 px image leaves layer4 (cam.py's maps) a 4x4 map, not 1x1; above, ImageNet's."""
    import torchvision
    if arch not in RESNETS:
        raise ValueError(f"unknown ResNet {arch!r}; choose from {', '.join(RESNETS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if img_size <= 64:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")   # torchvision's init
    net.out_dim, net.fc = net.fc.in_features, nn.Identity()
    net.arch, net.in_chans, net.img_size = arch, in_chans, img_size
    return net


def load_classifier(path, device="cpu"):
    """(model in eval mode, meta) from a finetune.py checkpoint (a ViT and its head) or curriculum.py's final
    classifier (a ResNet or a ViT): normalised (B, in_chans, img_size, img_size) images -> (B, classes) logits.
    meta: kind ("vit" | "cnn"), num_classes, classes, mean, std, img_size, in_chans, pool."""
    ckpt = read_checkpoint(path, "classifier checkpoint")
    if "num_classes" not in ckpt or ("encoder_config" not in ckpt and "backbone_config" not in ckpt):
        raise ValueError(f"{path} is neither a finetune.py nor a curriculum.py classifier checkpoint")
    name, num_classes = ckpt.get("backbone", "vit"), ckpt["num_classes"]
    cfg = dict(ckpt.get("backbone_config") or ckpt["encoder_config"])
    if name in RESNETS:
        model, kind, pool = build_resnet(name, cfg["in_chans"], cfg["img_size"]), "cnn", "avg"
        model.fc = nn.Linear(model.out_dim, num_classes)
    else:
        kind, pool = "vit", ckpt.get("pool", "cls")
        model = ViT(**cfg, num_classes=num_classes, global_pool="token" if pool == "cls" else "avg")
    model.load_state_dict(ckpt["model"])                             # strict: a mismatch fails loudly
    d = ckpt.get("data", {})
    return model.to(device).eval(), dict(kind=kind, num_classes=num_classes, pool=pool, mean=tuple(d["mean"]),
                                         classes=list(d.get("classes", range(num_classes))), std=tuple(d["std"]),
                                         img_size=cfg["img_size"], in_chans=cfg["in_chans"])


# ============================================================ 6. training: device, precision, preemption

def param_groups(model, weight_decay, layer_decay=None):
    """AdamW parameter groups: no weight decay on norms, biases (tensors of at most one dimension) and the learned
    tokens, weight_decay elsewhere. layer_decay (fine-tuning; BEiT, MAE): embeddings are layer 0, block i layer
    i + 1, the final norm and head depth + 1; a layer's lr is scaled by layer_decay ** (depth + 1 - layer)."""
    depth, groups = len(getattr(model, "blocks", [])), {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay, layer = p.ndim <= 1 or name.split(".")[-1] in ("cls_token", "mask_token", "pos_embed"), depth + 1
        if layer_decay is not None:
            layer = 0 if name.startswith(("cls_token", "pos_embed", "patch_embed")) else \
                int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth + 1
        g = groups.setdefault((layer, no_decay), dict(params=[], weight_decay=0.0 if no_decay else weight_decay,
                                                      lr_scale=(layer_decay or 1.0) ** (depth + 1 - layer)))
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]           # decay before no decay, layer by layer


def resolve_device(name):
    """--device auto | cpu | cuda | cuda:N | mps as a torch.device; one line (SystemExit) when there is none such."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if (device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()) or \
            (device.type == "mps" and not torch.backends.mps.is_available()):
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s) visible to "
                         f"torch{'' if device.type == 'cuda' else ' and no Apple GPU'}; use --device cpu (or auto)")
    return device


def output_dir(path):
    """--output-dir made and checked writable before any work: a file in its place, a read-only disk, one line."""
    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise SystemExit(f"error: --output-dir {path}: {e.strerror or e}; choose a folder you can write to") from None
    return path


def bf16_is_fast(device):
    """CUDA with bf16, or a CPU with native bf16 matmuls (AMX, AVX512-BF16); elsewhere bf16 is emulated, slower."""
    try:
        return torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and any(
            f in open("/proc/cpuinfo").read() for f in ("amx_bf16", "avx512_bf16"))
    except OSError:
        return False


def autocast(precision, device):
    """--precision auto|bf16|fp32 -> (context, "bf16"|"fp32"); auto: bf16 where fast. fp32 on a GPU may use TF32."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if precision == "bf16" or (precision == "auto" and bf16_is_fast(device)):
        return torch.autocast(device.type, dtype=torch.bfloat16), "bf16"
    return contextlib.nullcontext(), "fp32"


def reuse_freed_memory(device):
    """On a CPU under glibc, keep freed memory in the process instead of handing it back to the kernel, which made
    every step fault its activations in again (docs/speed.md). False, nothing changed, on other devices and libcs."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt if device.type == "cpu" else None
    except (OSError, AttributeError):
        return False
    # M_MMAP_THRESHOLD (-3): blocks up to 1 GiB come from the heap; M_TRIM_THRESHOLD (-1): the heap never shrinks
    return bool(mallopt and mallopt(-3, 1 << 30) and mallopt(-1, 2 ** 31 - 1))


class Preemption:
    """Preempted, lose nothing: SIGTERM (a scheduler, a spot instance), SIGUSR1 (SLURM's --signal) or SIGINT
    (Ctrl-C) only note the signal; the loop asks `if stop(): save(); stop.exit(f"step {step}", path)` after each
    step, so the step in progress finishes, the checkpoint is written at it, and the process exits with 128 + the
    signal (143 for SIGTERM: "terminated", which a scheduler can requeue on). A second signal is ignored.
    Under torch.distributed the ranks' answers are combined every step (a 4-byte all-reduce on a gloo group, off
    the GPU's stream): one signalled rank stops them all at the same step, none waits in a collective. Only the
    handler writes `noted`, so a signal landing during that all-reduce waits for the next step, never lost."""

    def __enter__(self):
        self.noted, signals = 0, [getattr(signal, s) for s in ("SIGTERM", "SIGUSR1", "SIGINT") if hasattr(signal, s)]
        self.old = {s: signal.signal(s, lambda n, frame: setattr(self, "noted", self.noted or n)) for s in signals}
        ddp = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.group = dist.new_group(backend="gloo") if ddp else None
        return self

    def __call__(self):
        flag = torch.tensor([self.noted])
        if self.group is not None:
            dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flag)
        return self.signum != 0

    def exit(self, where, path):
        """After rank 0 has saved `path`: every rank waits for it, rank 0 says so, and all exit with 128 + signal."""
        if self.group is not None:
            dist.barrier(group=self.group)
        if self.group is None or dist.get_rank() == 0:
            print(f"{signal.Signals(self.signum).name}: stopped after {where} and saved {path}; run the same command "
                  f"again to resume (exit status {128 + self.signum})", flush=True)
        raise SystemExit(128 + self.signum)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)
