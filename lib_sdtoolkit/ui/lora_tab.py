"""LoRA tools tab: extract a LoRA from two checkpoints, bake LoRAs into a checkpoint, inspect a LoRA file."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, List, Optional

import gradio as gr

from ..errors import InvalidInputError, SdToolkitError
from ..host import Host
from ..validate import check_path_text
from .common import error_html

TITLE = "LoRA tools"
ELEM_ID = "lora"


def _names(host: Host, kind: str) -> List[str]:
    return [host.display_name(p, kind) for p in host.list_models(kind)]


def _out_name(name: str) -> str:
    name = (name or "").strip()
    check_path_text(name, "output")
    if not name or Path(name).name != name:
        raise InvalidInputError(f"output must be a plain file name, not {name!r}")
    return name if name.lower().endswith(".safetensors") else name + ".safetensors"


def do_inspect(host: Host, name: Optional[str]) -> str:
    from ..lora.inspect_lora import inspect_lora

    try:
        rep = inspect_lora(host.resolve(name or "", "lora"))
    except SdToolkitError as exc:
        return error_html(exc)
    return f'<pre class="sdtoolkit-mono">{html.escape(json.dumps(rep, indent=1))}</pre>'


def do_extract(host: Host, tuned: str, base: str, output: str, rank: float, conv_rank: float, clamp: float,
               device: str, overwrite: bool, progress: Any = None) -> str:
    from ..lora.extract import extract_lora

    try:
        out_dir = host.output_dir("lora")
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / _out_name(output)
        tick = (lambda d, t: progress(d / max(t, 1), desc="extracting")) if progress is not None else None
        res = extract_lora(host.resolve(tuned, "checkpoint"), host.resolve(base, "checkpoint"), out, rank=int(rank),
                           conv_rank=int(conv_rank) or None, clamp_quantile=float(clamp), device=device,
                           overwrite=overwrite, progress=tick)
        host.refresh("lora")
    except SdToolkitError as exc:
        return error_html(exc)
    return f'<div class="sdtoolkit-ok">wrote {html.escape(res["output"])}: {res["layers"]} layers</div>'


def do_bake(host: Host, ckpt: str, loras: str, output: str, overwrite: bool, progress: Any = None) -> str:
    from ..lora.bake import bake, parse_lora_arg

    try:
        items = [parse_lora_arg(s.strip()) for s in (loras or "").splitlines() if s.strip()]
        if not items:
            raise InvalidInputError("give one LoRA per line as NAME[:MULT]")
        resolved = [(host.resolve(n, "lora"), m) for n, m in items]
        out = host.output_dir("checkpoint") / _out_name(output)
        tick = (lambda d, t: progress(d / max(t, 1), desc="baking")) if progress is not None else None
        res = bake(host.resolve(ckpt, "checkpoint"), resolved, out, overwrite=overwrite, progress=tick)
        host.refresh("checkpoint")
    except SdToolkitError as exc:
        return error_html(exc)
    return f'<div class="sdtoolkit-ok">wrote {html.escape(res["output"])}: {res["touched"]} tensors changed</div>'


def build(host: Host) -> None:
    with gr.Tab("Inspect", elem_id="sdtoolkit_lora_inspect_tab"):
        lora = gr.Dropdown(choices=_names(host, "lora"), label="LoRA", elem_id="sdtoolkit_lora_inspect_file")
        btn = gr.Button("Inspect", elem_id="sdtoolkit_lora_inspect_btn")
        out = gr.HTML()
        btn.click(lambda n: do_inspect(host, n), inputs=[lora], outputs=[out])
    with gr.Tab("Extract", elem_id="sdtoolkit_lora_extract_tab"):
        ck = _names(host, "checkpoint")
        tuned = gr.Dropdown(choices=ck, label="Tuned checkpoint", elem_id="sdtoolkit_lora_tuned")
        base = gr.Dropdown(choices=ck, label="Base checkpoint", elem_id="sdtoolkit_lora_base")
        with gr.Row():
            rank = gr.Number(value=32, label="Rank", precision=0)
            conv_rank = gr.Number(value=0, label="Conv rank (0 = attention only)", precision=0)
            clamp = gr.Number(value=0.99, label="Clamp quantile (1 = off)")
            device = gr.Dropdown(choices=["cpu", "cuda"], value="cpu", label="Device")
        output = gr.Textbox(label="Output file name", value="extracted.safetensors", elem_id="sdtoolkit_lora_ex_out")
        overwrite = gr.Checkbox(label="Overwrite", value=False)
        btn2 = gr.Button("Extract", variant="primary", elem_id="sdtoolkit_lora_extract_btn")
        res2 = gr.HTML()

        def _ex(t, b, o, r, c, q, d, ow, progress=gr.Progress()):
            return do_extract(host, t, b, o, r, c, q, d, ow, progress)
        btn2.click(_ex, inputs=[tuned, base, output, rank, conv_rank, clamp, device, overwrite], outputs=[res2])
    with gr.Tab("Bake", elem_id="sdtoolkit_lora_bake_tab"):
        ckpt = gr.Dropdown(choices=_names(host, "checkpoint"), label="Checkpoint", elem_id="sdtoolkit_lora_bake_ckpt")
        loras = gr.Textbox(lines=3, label="LoRAs, one per line: NAME[:MULT]", elem_id="sdtoolkit_lora_bake_list")
        output3 = gr.Textbox(label="Output file name", value="baked.safetensors")
        overwrite3 = gr.Checkbox(label="Overwrite", value=False)
        btn3 = gr.Button("Bake", variant="primary", elem_id="sdtoolkit_lora_bake_btn")
        res3 = gr.HTML()

        def _bk(c, ls, o, ow, progress=gr.Progress()):
            return do_bake(host, c, ls, o, ow, progress)
        btn3.click(_bk, inputs=[ckpt, loras, output3, overwrite3], outputs=[res3])
