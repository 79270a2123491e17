"""Double of modules/images.py (A1111 1.10.1): the grid functions scripts use to assemble image grids, as the X/Y/Z
plot (scripts/xyz_grid.py ``draw_xyz_grid``) does: ``image_grid(imgs, batch_size=1, rows=None)``,
``GridAnnotation(text='', is_active=True)``, ``draw_grid_annotations(im, width, height, hor_texts, ver_texts,
margin=0)``, ``get_font(fontsize)``. Same layout rules, options (``n_rows``, ``grid_prevent_empty_spots``,
``grid_background_color``, ``grid_text_active_color``, ``grid_text_inactive_color``, ``font``) and the
``image_grid`` callback (``script_callbacks.ImageGridLoopParams``).

Double only: the WebUI ships ``modules/Roboto-Regular.ttf`` (``paths_internal.roboto_ttf_file``); the double has no
font file, so ``get_font`` falls back to Pillow's built-in scalable font (``ImageFont.load_default(size)``). Text
width for shrinking a label that does not fit uses ``multiline_textbbox`` (A1111 pins Pillow 9.5 and calls
``multiline_textsize``, which Pillow 10 removed; both give the text's width). Saving images is not doubled."""
import math

from PIL import Image, ImageColor, ImageDraw, ImageFont

from modules import script_callbacks
from modules.shared import opts

roboto_ttf_file = None  # not shipped with the double (see above)


def get_font(fontsize):
    try:
        return ImageFont.truetype(opts.font or roboto_ttf_file, fontsize)
    except Exception:
        return ImageFont.load_default(fontsize)


def image_grid(imgs, batch_size=1, rows=None):
    if rows is None:
        if opts.n_rows > 0:
            rows = opts.n_rows
        elif opts.n_rows == 0:
            rows = batch_size
        elif opts.grid_prevent_empty_spots:
            rows = math.floor(math.sqrt(len(imgs)))
            while len(imgs) % rows != 0:
                rows -= 1
        else:
            rows = round(math.sqrt(len(imgs)))
    if rows > len(imgs):
        rows = len(imgs)
    cols = math.ceil(len(imgs) / rows)

    params = script_callbacks.ImageGridLoopParams(imgs, cols, rows)
    script_callbacks.image_grid_callback(params)

    w, h = map(max, zip(*(img.size for img in imgs)))
    background = ImageColor.getcolor(opts.grid_background_color, "RGB")
    grid = Image.new("RGB", size=(params.cols * w, params.rows * h), color=background)
    for i, img in enumerate(params.imgs):
        img_w, img_h = img.size
        dx = 0 if img_w == w else (w - img_w) // 2
        dy = 0 if img_h == h else (h - img_h) // 2
        grid.paste(img, box=(i % params.cols * w + dx, i // params.cols * h + dy))
    return grid


class GridAnnotation:
    def __init__(self, text="", is_active=True):
        self.text = text
        self.is_active = is_active
        self.size = None


def draw_grid_annotations(im, width, height, hor_texts, ver_texts, margin=0):
    """Labels above the columns (``hor_texts``: one list of GridAnnotation per column) and left of the rows
    (``ver_texts``), on a background band; cells spaced by ``margin``. Asserts one label list per column / row."""
    color_active = ImageColor.getcolor(opts.grid_text_active_color, "RGB")
    color_inactive = ImageColor.getcolor(opts.grid_text_inactive_color, "RGB")
    color_background = ImageColor.getcolor(opts.grid_background_color, "RGB")

    def wrap(drawing, text, font, line_length):
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if drawing.textlength(line, font=font) <= line_length:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    def text_width(drawing, text, font):
        box = drawing.multiline_textbbox((0, 0), text, font=font)
        return box[2] - box[0]

    def draw_texts(drawing, draw_x, draw_y, lines, initial_fnt, initial_fontsize):
        for line in lines:
            fnt, fontsize = initial_fnt, initial_fontsize
            while text_width(drawing, line.text, fnt) > line.allowed_width and fontsize > 0:
                fontsize -= 1
                fnt = get_font(fontsize)
            drawing.multiline_text((draw_x, draw_y + line.size[1] / 2), line.text, font=fnt,
                                   fill=color_active if line.is_active else color_inactive, anchor="mm", align="center")
            if not line.is_active:
                drawing.line((draw_x - line.size[0] // 2, draw_y + line.size[1] // 2, draw_x + line.size[0] // 2,
                              draw_y + line.size[1] // 2), fill=color_inactive, width=4)
            draw_y += line.size[1] + line_spacing

    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    fnt = get_font(fontsize)
    pad_left = 0 if sum(sum(len(line.text) for line in lines) for lines in ver_texts) == 0 else width * 3 // 4

    cols = im.width // width
    rows = im.height // height
    assert cols == len(hor_texts), f"bad number of horizontal texts: {len(hor_texts)}; must be {cols}"
    assert rows == len(ver_texts), f"bad number of vertical texts: {len(ver_texts)}; must be {rows}"

    calc_d = ImageDraw.Draw(Image.new("RGB", (1, 1), color_background))
    for texts, allowed_width in zip(hor_texts + ver_texts, [width] * len(hor_texts) + [pad_left] * len(ver_texts)):
        items = [] + texts
        texts.clear()
        for line in items:
            texts += [GridAnnotation(x, line.is_active) for x in wrap(calc_d, line.text, fnt, allowed_width)]
        for line in texts:
            bbox = calc_d.multiline_textbbox((0, 0), line.text, font=fnt)
            line.size = (bbox[2] - bbox[0], bbox[3] - bbox[1])
            line.allowed_width = allowed_width

    hor_text_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing for lines in hor_texts]
    ver_text_heights = [sum(line.size[1] + line_spacing for line in lines) - line_spacing * len(lines)
                        for lines in ver_texts]
    pad_top = 0 if sum(hor_text_heights) == 0 else max(hor_text_heights) + line_spacing * 2

    result = Image.new("RGB", (im.width + pad_left + margin * (cols - 1), im.height + pad_top + margin * (rows - 1)),
                       color_background)
    for row in range(rows):
        for col in range(cols):
            cell = im.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))

    d = ImageDraw.Draw(result)
    for col in range(cols):
        x = pad_left + (width + margin) * col + width / 2
        y = pad_top / 2 - hor_text_heights[col] / 2
        draw_texts(d, x, y, hor_texts[col], fnt, fontsize)
    for row in range(rows):
        x = pad_left / 2
        y = pad_top + (height + margin) * row + height / 2 - ver_text_heights[row] / 2
        draw_texts(d, x, y, ver_texts[row], fnt, fontsize)
    return result
