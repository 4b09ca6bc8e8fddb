#!/usr/bin/env node
// Classify texts or image files with an exported zmdevice model, from the command line.
//
//   node classify.mjs export/NAME.onnx "a sentence" "another one"   [--top-k 3] [--json]
//   node classify.mjs export/NAME.onnx photo.png scan.jpg           [--top-k 3] [--json]
//
// Prints `input<TAB>class probability ...` per input, or with --json the same fields as
// `zmdevice predict --json` ({model, modality, classes, predictions: [{input, top}]}),
// plus each input's probabilities and logits. Exit code 2 on bad usage or input.

import { readFile } from 'node:fs/promises';

import { classify, decodeImage, loadModel } from './model.mjs';

function parseArguments(argv) {
  const options = { topK: 1, json: false, inputs: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--json') options.json = true;
    else if (argv[i] === '--top-k') options.topK = Number(argv[++i]);
    else options.inputs.push(argv[i]);
  }
  options.model = options.inputs.shift();
  if (!options.model || options.inputs.length === 0 || !(options.topK >= 1)) {
    throw new Error('usage: node classify.mjs MODEL.onnx INPUT... [--top-k K] [--json]');
  }
  return options;
}

async function main() {
  const options = parseArguments(process.argv.slice(2));
  const model = await loadModel(options.model);
  const inputs =
    model.modality === 'text'
      ? options.inputs
      : await Promise.all(
          options.inputs.map(async (file) => {
            try {
              return decodeImage(await readFile(file));
            } catch (error) {
              throw new Error(`cannot read image ${file}: ${error.message}`);
            }
          }),
        );
  const results = await classify(model, inputs, { topK: Math.min(options.topK, model.classes.length) });
  const predictions = results.map((result, i) => ({ input: options.inputs[i], ...result }));
  if (options.json) {
    const summary = { model: options.model, modality: model.modality, classes: model.classes, predictions };
    console.log(JSON.stringify(summary));
  } else {
    for (const { input, top } of predictions) {
      console.log(`${input}\t${top.map((t) => `${t.class} ${t.probability.toFixed(3)}`).join('  ')}`);
    }
  }
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(2);
});
