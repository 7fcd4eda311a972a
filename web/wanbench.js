// Shows the benchmark summary that Wan Benchmark Report returns (ui.text) under the node.
// The chart (ui.images) is previewed by ComfyUI itself. The widget is display-only: it is never
// saved in the workflow nor sent with the prompt.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const SUMMARY = "wanbench_summary";

app.registerExtension({
  name: "WanBench.ReportSummary",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "WanBenchReport") {
      return;
    }
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = (message?.text ?? []).join("\n");
      let widget = this.widgets?.find((w) => w.name === SUMMARY);
      if (!widget) {
        widget = ComfyWidgets.STRING(this, SUMMARY, ["STRING", { multiline: true }], app).widget;
        widget.serialize = false;
        widget.options = { ...(widget.options ?? {}), serialize: false };
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
        }
      }
      widget.value = text;
      this.setDirtyCanvas?.(true, true);
    };
  },
});
