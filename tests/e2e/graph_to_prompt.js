// Loads a UI-format workflow into the ComfyUI frontend and converts it the way the "Queue" button
// does. Evaluated as `(<this function>)(<workflow JSON>)`; resolves to
// {declared, missing, unresolved, output}:
//   declared   - every node type the workflow names (subgraph definitions included),
//   missing    - declared types the frontend has no node definition for (subgraph ids excepted),
//   unresolved - types of loaded nodes that the frontend flagged or could not resolve,
//   output     - the API graph from app.graphToPrompt().
async (workflow) => {
  const registered = window.LiteGraph.registered_node_types;
  const subgraphs = (workflow.definitions && workflow.definitions.subgraphs) || [];
  const subgraphIds = new Set(subgraphs.map((s) => s.id));
  const declared = [];
  for (const n of workflow.nodes || []) declared.push(n.type);
  for (const s of subgraphs) for (const n of s.nodes || []) declared.push(n.type);
  const missing = declared.filter((t) => !(t in registered) && !subgraphIds.has(t));

  await window.app.loadGraphData(structuredClone(workflow));
  const loaded = window.app.graph.nodes || window.app.graph._nodes;
  const unresolved = loaded
    .filter((n) => n.has_errors || (!(n.type in registered) && !subgraphIds.has(n.type)))
    .map((n) => n.type);

  const prompt = await window.app.graphToPrompt();
  return { declared, missing, unresolved, output: prompt.output };
}
