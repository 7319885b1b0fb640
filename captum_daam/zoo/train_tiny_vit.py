"""Train the bundled tiny ViT on freshly generated shapes (deterministic, CPU).

    python -m captum_daam.zoo.train_tiny_vit --out captum_daam/zoo/tiny_vit_shapes.safetensors

Each epoch draws new images from :func:`captum_daam.data.make_shapes` (seed = epoch), so the
model never sees an image twice; held-out accuracy is measured on 2,000 images of a seed no
epoch uses. The same command on the same machine and thread count gives the same weights.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from ..data import make_shapes
from . import TINY_VIT_CONFIG

HELD_OUT_SEED = 10_000


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(batch).argmax(1) for batch in images.split(500)])
    return float((predictions == labels).float().mean())


def train(epochs: int, images_per_epoch: int, batch_size: int, lr: float, threads: int):
    """Train from seed 0; returns the model (eval mode), its held-out accuracy and seconds."""
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        return _train(epochs, images_per_epoch, batch_size, lr)
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)


def _train(epochs: int, images_per_epoch: int, batch_size: int, lr: float):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**TINY_VIT_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps_per_epoch = images_per_epoch // batch_size
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    held_out_images, held_out_labels, _ = make_shapes(2000, seed=HELD_OUT_SEED)
    held_out_labels = held_out_labels[:, 0]
    start = time.time()
    for epoch in range(epochs):
        images, labels, _ = make_shapes(images_per_epoch, seed=epoch)
        labels = labels[:, 0]
        order = torch.randperm(images_per_epoch)
        model.train()
        running = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(images[batch]), labels[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += float(loss.detach())
        accuracy = evaluate(model, held_out_images, held_out_labels)
        print(f"epoch {epoch + 1}/{epochs}: loss {running / steps_per_epoch:.4f}, held-out "
              f"accuracy {accuracy:.4f}, {time.time() - start:.0f} s", flush=True)
    return model.eval(), accuracy, time.time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the safetensors weights")
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--images-per-epoch", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    model, accuracy, seconds = train(
        args.epochs, args.images_per_epoch, args.batch_size, args.lr, args.threads
    )
    from safetensors.torch import save_file

    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, args.out, metadata={"held_out_accuracy": f"{accuracy:.4f}"})
    print(f"wrote {args.out}: held-out accuracy {accuracy:.4f} on 2,000 images, {seconds:.0f} s")


if __name__ == "__main__":
    main()
