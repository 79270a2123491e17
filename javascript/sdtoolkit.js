// SD Toolkit browser helpers (loaded by the WebUI from javascript/*.js). Plain functions, no globals besides these.

/* Insert `text` at the cursor of the txt2img / img2img prompt box (tab: "txt2img" | "img2img").
   Fires an "input" event so gradio sees the change. Returns true when inserted. */
function sdtoolkitInsertAtCursor(tab, text) {
    var app = typeof gradioApp === "function" ? gradioApp() : document;
    var box = app.querySelector("#" + tab + "_prompt textarea");
    if (!box) return false;
    var start = box.selectionStart == null ? box.value.length : box.selectionStart;
    var end = box.selectionEnd == null ? start : box.selectionEnd;
    var before = box.value.slice(0, start), after = box.value.slice(end);
    var sep = before && !/[\s,]$/.test(before) ? " " : "";
    box.value = before + sep + text + after;
    var pos = (before + sep + text).length;
    box.selectionStart = box.selectionEnd = pos;
    box.dispatchEvent(new Event("input", {bubbles: true}));
    box.focus();
    return true;
}

/* `<lora:NAME:WEIGHT>` as the WebUI's extra-network parser reads it (`<(\w+):([^>]+)>`, items split on ":"). */
function sdtoolkitLoraTag(name, weight) {
    var w = weight == null ? 1 : weight;
    return "<lora:" + String(name).replace(/[<>:]/g, "_") + ":" + w + ">";
}

/* Copy a text to the clipboard (used by "copy report" buttons); resolves to true on success. */
function sdtoolkitCopy(text) {
    if (navigator.clipboard && navigator.clipboard.writeText) {
        return navigator.clipboard.writeText(text).then(function() { return true; }, function() { return false; });
    }
    return Promise.resolve(false);
}
