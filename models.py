"""The five MNIST models and their recipes, in one registry.

Every model takes normalised images [N, 1, 28, 28] and returns log-probabilities [N, 10].
A recipe is a plain dict; `documented` holds what the source's write-up states, `reconstructed`
names the parts this project had to choose because the source does not say.
The sources: ../shared/seeds/ and ../shared/RECIPES.md.

    python models.py [NAME ...]   per-layer summary of the named models (default: all five)

Also here: the speed options that change the model (FastDropout, torch.compile), and running a
model over images (predict, score), which every script shares.
"""
import argparse
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from errors import UserError, one_line_errors


def block(cin, cout, k=3, pad=0, drop=0.0):
    """Conv (no bias) then ReLU, BatchNorm, Dropout: the order sources 000 and 003 write."""
    post = [nn.ReLU(), nn.BatchNorm2d(cout)]
    if drop:
        post.append(nn.Dropout(drop))
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, bias=False), *post)


class BnGap(nn.Module):
    """Source 000: ReLU+BN+Dropout(0.05) conv blocks, 1x1 convs for width, final conv, GAP.
    The layers are not documented: this is our design in that family (18,304 params)."""

    def __init__(self, drop=0.05):
        super().__init__()
        self.features = nn.Sequential(
            block(1, 16, drop=drop),            # 26
            block(16, 32, drop=drop),           # 24
            nn.Conv2d(32, 12, 1, bias=False),   # 1x1 transition
            nn.MaxPool2d(2),                    # 12
            block(12, 16, drop=drop),           # 10
            block(16, 16, drop=drop),           # 8
            block(16, 24, drop=drop),           # 6
            block(24, 24, pad=1, drop=drop),    # 6
            nn.AdaptiveAvgPool2d(1),            # GAP
            nn.Conv2d(24, 10, 1, bias=False),   # final 1x1 conv to the 10 classes
        )

    def forward(self, x):
        return F.log_softmax(self.features(x).flatten(1), dim=1)


class Conv4Fc(nn.Module):
    """Source 001: four 3x3 convs (no padding, bias) and one Linear, 24,552 params. The source's
    diagram puts pools after conv1, conv2 and conv4, which cannot give its 896 = 56x4x4
    flatten; pools after conv2 and conv4 can (RECIPES.md)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.conv3 = nn.Conv2d(16, 22, 3)
        self.conv4 = nn.Conv2d(22, 56, 3)
        self.fc1 = nn.Linear(56 * 4 * 4, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)   # 28 -> 24 -> 12
        x = F.max_pool2d(F.relu(self.conv4(F.relu(self.conv3(x)))), 2)   # 12 -> 8 -> 4
        return F.log_softmax(self.fc1(x.flatten(1)), dim=1)


class Gap10k(nn.Module):
    """Source 002's layer table: 3x3 convs with padding 1 and bias, each followed by ReLU, BN,
    Dropout(0.05); MaxPool then 1x1 transitions; 1x1 head then GAP. 9,798 params."""

    def __init__(self, drop=0.05):
        super().__init__()

        def conv(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(cout), nn.Dropout(drop))

        self.features = nn.Sequential(
            conv(1, 10), conv(10, 16),                  # 28
            nn.MaxPool2d(2), nn.Conv2d(16, 10, 1),      # 14
            conv(10, 16), conv(16, 16),
            nn.MaxPool2d(2), nn.Conv2d(16, 10, 1),      # 7
            conv(10, 16), conv(16, 16),
            nn.Conv2d(16, 10, 1),
            nn.AdaptiveAvgPool2d(1),
        )

    def forward(self, x):
        return F.log_softmax(self.features(x).flatten(1), dim=1)


class BnDrop(nn.Module):
    """Source 003: conv blocks with ReLU, BN, Dropout(0.1); 13,808 params documented, layers not.
    Reconstruction: the common 1-16-32 | 1x1 -> 10, pool | 16-16-16-16 | GAP, 1x1 -> 10 layout,
    which lands on exactly 13,808."""

    def __init__(self, drop=0.1):
        super().__init__()
        self.features = nn.Sequential(
            block(1, 16, drop=drop),            # 26
            block(16, 32, drop=drop),           # 24
            nn.Conv2d(32, 10, 1, bias=False),
            nn.MaxPool2d(2),                    # 12
            block(10, 16, drop=drop),           # 10
            block(16, 16, drop=drop),           # 8
            block(16, 16, drop=drop),           # 6
            block(16, 16, pad=1, drop=drop),    # 6
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(16, 10, 1, bias=False),
        )

    def forward(self, x):
        return F.log_softmax(self.features(x).flatten(1), dim=1)


class BnFc(nn.Module):
    """Source 004: Conv-BN-ReLU blocks (bias on, as in the source's count), two pools, a 2x2 conv
    to 1x1, Linear 16 -> 10. 9,594 params."""

    def __init__(self):
        super().__init__()

        def conv(cin, cout, k=3):
            return nn.Sequential(nn.Conv2d(cin, cout, k), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            conv(1, 8), conv(8, 16), nn.MaxPool2d(2),       # 26, 24, 12
            conv(16, 16), conv(16, 16), nn.MaxPool2d(2),    # 10, 8, 4
            conv(16, 16), conv(16, 16, k=2),                # 2, 1
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return F.log_softmax(self.fc(self.features(x).flatten(1)), dim=1)


# The registry. Every model ends in log_softmax and trains with NLL (source 001 applies CrossEntropyLoss
# to its log_softmax output: log_softmax is idempotent, so that is NLL too). Keys of a recipe:
#   model        the nn.Module class
#   optimizer    (name in torch.optim, kwargs)
#   schedule     None or (name in torch.optim.lr_scheduler, kwargs, "batch" | "epoch")
#                OneCycleLR gets total_steps filled in from epochs and steps per epoch.
#   augment      data.augment dict: rotate (deg), translate (px), crop (size) with crop_p
#   batch_size, epochs
#   documented   the source's figures: best_test_acc (%), best_epoch (1-based), params,
#                seconds_per_epoch, source (its write-up's file), notes, and test_acc_by_epoch: the
#                source's own per-epoch test accuracy (%), index 0 = epoch 1, None for an epoch its log
#                leaves out; None where the source publishes no per-epoch test log
#   reconstructed  which parts are our choice, not the source's
RECIPES = {
    "bn_gap": dict(
        model=BnGap,
        optimizer=("SGD", dict(lr=0.01, momentum=0.9)),
        schedule=("OneCycleLR", dict(max_lr=0.1, pct_start=0.25, div_factor=10, final_div_factor=100), "batch"),
        augment=dict(rotate=7),
        batch_size=128,
        epochs=20,
        documented=dict(best_test_acc=99.55, best_epoch=15, final_test_acc=99.54, params=None,
                        seconds_per_epoch=None, source="000_6c444237f28cae73.txt",
                        notes="the source's log counts epochs from 0: its 'Epoch 14' is the 15th",
                        # its "Epoch 0" ... "Epoch 19", as our epochs 1 ... 20
                        test_acc_by_epoch=[98.24, 99.04, 99.31, 99.33, 99.41, 99.30, 99.43, 99.41, 99.37, 99.51,
                                           99.46, 99.54, 99.46, 99.53, 99.55, 99.53, 99.54, 99.53, 99.54, 99.54]),
        reconstructed=["layers", "params", "optimizer", "schedule", "augment", "batch_size"],
    ),
    "conv4_fc": dict(
        model=Conv4Fc,
        optimizer=("SGD", dict(lr=0.001, momentum=0.9)),
        schedule=("StepLR", dict(step_size=15, gamma=0.1), "epoch"),
        augment=dict(crop=22, crop_p=0.1, rotate=15),
        batch_size=32,
        epochs=1,
        documented=dict(best_test_acc=95.21, best_epoch=1, params=24552, seconds_per_epoch=None,
                        source="001_14c6d933e153585f.txt",
                        notes="95.21% was measured on the 60,000 training images, not the test set",
                        test_acc_by_epoch=None),  # one epoch, and its one figure is a training-set one
        reconstructed=["pool placement (the source's diagram cannot give its 896-wide flatten)"],
    ),
    "gap10k": dict(
        model=Gap10k,
        optimizer=("SGD", dict(lr=0.015, momentum=0.9, weight_decay=1e-4)),
        schedule=("OneCycleLR", dict(max_lr=0.015), "batch"),
        augment=dict(rotate=7),
        batch_size=128,
        epochs=19,
        documented=dict(best_test_acc=99.38, best_epoch=16, final_test_acc=99.33, params=9798,
                        seconds_per_epoch=21.5, source="002_f505d3a248fa0eb2.txt",
                        notes="about 21-22 s per epoch on CUDA",
                        # its "Accuracy Progression" table skips epochs 8, 9, 13, 14, 17 and 18
                        test_acc_by_epoch=[84.70, 97.00, 97.48, 98.32, 98.11, 98.86, 98.98, None, None, 99.01,
                                           99.12, 99.18, None, None, 99.29, 99.38, None, None, 99.33]),
        reconstructed=["OneCycleLR settings beyond max_lr (torch defaults)"],
    ),
    "bn_drop": dict(
        model=BnDrop,
        optimizer=("SGD", dict(lr=0.01, momentum=0.9)),
        schedule=None,
        augment={},
        batch_size=64,
        epochs=20,
        documented=dict(best_test_acc=99.44, best_epoch=15, final_test_acc=99.41, params=13808,
                        seconds_per_epoch=None, source="003_a3980a8fa7621995.txt",
                        notes="the log's best is 99.44%; the README text says 'approximately 99.46%'",
                        test_acc_by_epoch=[98.32, 98.88, 99.12, 99.23, 99.23, 99.21, 99.19, 99.27, 99.29, 99.31,
                                           99.41, 99.31, 99.41, 99.43, 99.44, 99.38, 99.39, 99.38, 99.40, 99.41]),
        reconstructed=["layers (matched to the documented 13,808)", "no schedule, no augmentation (none mentioned)"],
    ),
    "bn_fc": dict(
        model=BnFc,
        optimizer=("Adagrad", dict(lr=0.1)),
        # final_div_factor=7.5 is not stated in the source's text, but its log's per-epoch LR column
        # (0.262710, ..., 0.049657) matches this schedule to 5e-7 and torch's default (1e4) misses by 0.013
        schedule=("OneCycleLR", dict(max_lr=0.75, div_factor=7.5, final_div_factor=7.5, pct_start=0.3,
                                     anneal_strategy="cos", cycle_momentum=False), "batch"),
        augment=dict(rotate=15, translate=2),
        batch_size=128,
        epochs=10,
        documented=dict(best_test_acc=99.64, best_epoch=10, final_test_acc=99.64, params=9594,
                        seconds_per_epoch=86, source="004_cdd6a8636d3ab82f.txt",
                        notes="about 86 s per epoch, device not stated",
                        test_acc_by_epoch=[95.10, 98.75, 96.94, 99.08, 99.33, 99.34, 99.54, 99.57, 99.60, 99.64]),
        reconstructed=["rotation and translation as one RandomAffine",
                       "final_div_factor 7.5, inferred from the source's logged learning rates"],
    ),
}


class UnknownModel(UserError):
    pass


def get_recipe(name):
    if name not in RECIPES:
        raise UnknownModel(f"unknown model '{name}'; choose one of: {', '.join(RECIPES)}")
    return RECIPES[name]


def build_model(name):
    return get_recipe(name)["model"]()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def build_optimizer(recipe, model, lr=None):
    name, kw = recipe["optimizer"]
    kw = dict(kw)
    if lr is not None:
        kw["lr"] = lr
    if name == "SGD" and next(model.parameters()).device.type == "cuda":
        kw["fused"] = True  # one kernel per step instead of a few per parameter group: the same update
    return getattr(torch.optim, name)(model.parameters(), **kw)


def build_schedule(recipe, optimizer, epochs, steps_per_epoch, lr=None):
    """(scheduler or None, 'batch' | 'epoch'). --lr overrides OneCycleLR's max_lr."""
    if recipe["schedule"] is None:
        return None, "epoch"
    name, kw, every = recipe["schedule"]
    kw = dict(kw)
    if name == "OneCycleLR":
        kw["total_steps"] = epochs * steps_per_epoch
        if lr is not None:
            kw["max_lr"] = lr
    try:
        return getattr(torch.optim.lr_scheduler, name)(optimizer, **kw), every
    except ZeroDivisionError:  # a phase of no steps: OneCycleLR's warm-up of pct_start * total_steps - 1 = 0
        raise UserError(f"the recipe's {name} schedule cannot run {epochs * steps_per_epoch} steps in all "
                        f"({epochs} epochs of {steps_per_epoch}): one of its phases would last no step; train "
                        "on more images or for more epochs") from None


def summary(name):
    """torchinfo's per-layer table (layer, output shape, params) as text, like the sources' torchsummary."""
    from torchinfo import summary as info
    stats = info(build_model(name), input_size=(1, 1, 28, 28), col_names=("output_size", "num_params"),
                 depth=3, verbose=0, device="cpu")
    return str(stats).replace("(Units.MEGABYTES)", "(M)")  # torchinfo prints the enum on Python 3.11


def from_checkpoint(ckpt):
    """The eval-mode model (CPU) of a checkpoint dict that runfiles.load_checkpoint validated."""
    model = build_model(ckpt["model_name"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"checkpoint weights do not fit the {ckpt['model_name']} model "
                        "(other layer names or shapes)") from None
    return model.eval()


@torch.no_grad()
def log_probs(model, images, batch_size=256):
    """Log-probabilities [N, 10] on the CPU for uint8 images [N, 28, 28] (on any device); each batch
    is moved to the model's device and normalised there. Batches of 256: on a CPU, 1.5-3x faster than
    1000 (the activations stay in cache), with the same numbers to the bit for all five recipes."""
    model.eval()
    dev = next(model.parameters()).device
    return torch.cat([model(data.normalize(images[i:i + batch_size].to(dev))).float().cpu()
                      for i in range(0, len(images), batch_size)])


def loss_and_accuracy(logp, y):
    """(mean NLL, correct count, accuracy % rounded to 2 decimals) of log-probabilities against labels."""
    correct = int((logp.argmax(1) == y.cpu()).sum())
    return F.nll_loss(logp, y.cpu()).item(), correct, round(100 * correct / len(y), 2)




# ------------------------------------------------------------------------- speed options

class FastDropout(nn.Module):
    """nn.Dropout with a cheaper mask on CPU, where torch's bernoulli_ takes ~40% of a gap10k
    training step (BENCHMARKS.md): 16-bit uniform draws carved from 64-bit random words, so the
    drop probability is p rounded to 1/65536. Same expectation and scaling; identity in eval;
    other devices use F.dropout. Opt-in (--fast-dropout): it draws a different random stream."""

    def __init__(self, p):
        super().__init__()
        self.p = p
        self.threshold = round(p * 65536) - 32768

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            x = x.contiguous()
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        # the mask in x's own memory layout (NCHW or NHWC): mixed layouts make every later op slow
        keep = words.view(torch.int16)[:n].as_strided(x.shape, x.stride()) >= self.threshold
        return torch.where(keep, x * (1 / (1 - self.p)), 0)  # one masked op each way, no mask cast


def use_fast_dropout(model):
    for name, child in model.named_children():
        if isinstance(child, nn.Dropout):
            setattr(model, name, FastDropout(child.p))
        else:
            use_fast_dropout(child)
    return model


def quiet_inductor():
    """torch's CUDA wheel warns 'No CUDA runtime is found' when inductor starts on a CPU-only
    machine: true and beside the point for CPU code."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def compile_model(model, cudagraphs=True, device=None, dynamic=False):
    """torch.compile(model) with static shapes (a short last batch gets its own graph instead of
    sending every later batch through a dynamic one); on CUDA with CUDA graphs (mode
    reduce-overhead) unless cudagraphs=False. Returns the compiled wrapper, which shares the
    module's parameters and buffers. `model` may be any function (whole_step.WholeStep's step) given the
    `device` it runs on and the `dynamic` setting it wants."""
    torch._dynamo.reset()  # fresh caches: an earlier model's recompiles must not use up this one's limit
    quiet_inductor()
    graphs = cudagraphs and (device or next(model.parameters()).device).type == "cuda"
    return torch.compile(model, mode="reduce-overhead" if graphs else None, dynamic=dynamic)


def check_amp(device):
    """--amp is bfloat16 autocast: refuse it on GPUs that only emulate bfloat16 (T4, V100), where
    it runs slowly without a word."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError(f"--amp uses bfloat16, which {torch.cuda.get_device_name(device)} only emulates "
                        "(slower than fp32); drop --amp on this GPU")


def build(recipe, device, channels_last=False, fast_dropout=False):
    """The recipe's model on `device` with the layout and dropout speed flags applied."""
    model = recipe["model"]().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fast_dropout:
        use_fast_dropout(model)
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description="Print the per-layer summary (output shape, parameters) of models "
                                "in the registry, as the sources' torchsummary tables do.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"models to show (default: all of {', '.join(RECIPES)})")
    args = p.parse_args(argv)
    with one_line_errors():
        for n in args.names:
            get_recipe(n)
    for n in args.names or list(RECIPES):
        print(f"{n}  (source {RECIPES[n]['documented']['source'][:3]})")
        print(summary(n))
        print()


if __name__ == "__main__":
    main()
