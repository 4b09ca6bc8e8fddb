// Load an exported zmdevice model in Node.js and classify texts or image files with it.
// Shared by classify.mjs (command line) and serve.mjs (HTTP endpoint).
//
// All preprocessing comes from ../web/preprocess.mjs, the module the browser page uses:
// one JavaScript implementation of the contract, tested against the Python runtime.
// Image files are decoded in pure JavaScript: PNG (pngjs: 8-bit grey, grey+alpha, RGB,
// RGBA, palette, with transparency) gives the same pixels as PIL; JPEG (jpeg-js) may
// differ from PIL's libjpeg by a level or two per pixel.

import { readFile } from 'node:fs/promises';
import path from 'node:path';

import { Tokenizer } from '@huggingface/tokenizers';
import jpeg from 'jpeg-js';
import * as ort from 'onnxruntime-node';
import pngjs from 'pngjs';

import {
  encodeText,
  imageInput,
  padRows,
  parseModelMetadata,
  readMetadata,
  softmax,
  tokenizerFileName,
  topK,
} from '../web/preprocess.mjs';

/** Inputs per onnxruntime call, as `zmdevice predict` batches them. */
export const BATCH_SIZE = 32;

/** Largest image decoded (width x height), as zmdevice.images.MAX_IMAGE_PIXELS: a PNG of
 * 1 MB can declare 20000 x 20000 pixels and take gigabytes to decode. */
export const MAX_IMAGE_PIXELS = 100_000_000;

/** Characters of a text tokenized per max_length token, at most (see cutText). */
const CHARS_PER_TOKEN = 64;

/** Bad input (a text or an image), as opposed to a failure of the model or the machine. */
export class InputError extends Error {}

/** The session, metadata and (text models) tokenizer of NAME.onnx; errors are one line. */
export async function loadModel(modelPath, { threads = 1 } = {}) {
  let bytes;
  try {
    bytes = new Uint8Array(await readFile(modelPath));
  } catch (error) {
    throw new Error(`cannot read model ${modelPath}: ${error.code ?? error.message}`);
  }
  // metadata_props are read from the ONNX protobuf; an .ort file is a FlatBuffer, so its
  // metadata comes from the session (onnxruntime-node exposes none), hence .onnx here.
  let metadata;
  try {
    metadata = readMetadata(bytes);
  } catch (error) {
    throw new Error(`${modelPath} is not an ONNX file (${error.message}): give the .onnx file of \`zmdevice export\``);
  }
  let info;
  try {
    info = parseModelMetadata(metadata);
  } catch (error) {
    throw new Error(`${modelPath}: ${error.message}`);
  }
  let session;
  try {
    session = await ort.InferenceSession.create(bytes, { executionProviders: ['cpu'], intraOpNumThreads: threads });
  } catch (error) {
    throw new Error(`onnxruntime cannot load ${modelPath}: ${firstLine(error.message)}`);
  }
  let tokenizer = null;
  if (info.modality === 'text') {
    let name;
    try {
      name = tokenizerFileName(info.preprocess);
    } catch (error) {
      throw new Error(`${modelPath}: ${error.message}`);
    }
    const file = path.join(path.dirname(modelPath), name);
    let json;
    try {
      json = JSON.parse(await readFile(file, 'utf8'));
    } catch (error) {
      throw new Error(`${modelPath} needs its tokenizer file ${file}: ${firstLine(error.message)}`);
    }
    tokenizer = new Tokenizer(json, {});
  }
  return { name: path.basename(modelPath), session, tokenizer, ...info };
}

function firstLine(message) {
  return String(message).trim().split('\n')[0];
}

const PNG_SIGNATURE = Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]);

/** Width and height declared by a JPEG's start-of-frame segment, or null if there is none. */
function jpegSize(buffer) {
  let pos = 2;
  while (pos + 9 <= buffer.length) {
    if (buffer[pos] !== 0xff) return null;
    const marker = buffer[pos + 1];
    if (marker === 0xff) {
      pos += 1; // fill byte
    } else if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) {
      pos += 2; // no length
    } else if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      return { height: buffer.readUInt16BE(pos + 5), width: buffer.readUInt16BE(pos + 7) };
    } else if (marker === 0xda || marker === 0xd9) {
      return null; // image data before any frame header
    } else {
      pos += 2 + buffer.readUInt16BE(pos + 2);
    }
  }
  return null;
}

/** Refuse an image whose header declares more than MAX_IMAGE_PIXELS, before decoding it. */
function checkDeclaredSize(size) {
  if (size && size.width * size.height > MAX_IMAGE_PIXELS) {
    throw new InputError(
      `${size.width} x ${size.height} pixels is more than the ${MAX_IMAGE_PIXELS.toLocaleString('en-US')} decoded at most`,
    );
  }
}

/** Decode PNG or JPEG bytes to interleaved 8-bit pixels; throws InputError if it cannot. */
export function decodeImage(bytes) {
  const buffer = Buffer.from(bytes);
  if (buffer.subarray(0, 8).equals(PNG_SIGNATURE)) {
    // the IHDR chunk comes first: width and height at bytes 16 and 20; without it the size
    // cannot be checked before decoding, so the file is refused (PNG requires it there)
    if (buffer.length < 24 || buffer.toString('latin1', 12, 16) !== 'IHDR') {
      throw new InputError('cannot decode PNG: no IHDR header chunk first');
    }
    checkDeclaredSize({ width: buffer.readUInt32BE(16), height: buffer.readUInt32BE(20) });
    let png;
    try {
      // RGBA always (grey and palette expanded, tRNS transparency applied)
      png = pngjs.PNG.sync.read(buffer);
    } catch (error) {
      throw new InputError(`cannot decode PNG: ${firstLine(error.message)}`);
    }
    if (png.depth !== 8 && png.depth !== 1 && png.depth !== 2 && png.depth !== 4) {
      throw new InputError(`${png.depth}-bit PNG: convert it to 8-bit first`);
    }
    return { pixels: png.data, width: png.width, height: png.height, channels: 4 };
  }
  if (buffer[0] === 0xff && buffer[1] === 0xd8) {
    checkDeclaredSize(jpegSize(buffer));
    let image;
    try {
      image = jpeg.decode(buffer, {
        formatAsRGBA: false,
        useTArray: true,
        maxResolutionInMP: MAX_IMAGE_PIXELS / 1e6,
      });
    } catch (error) {
      throw new InputError(`cannot decode JPEG: ${firstLine(error.message)}`);
    }
    return { pixels: image.data, width: image.width, height: image.height, channels: 3 };
  }
  throw new InputError('unsupported image format: PNG and JPEG only');
}

/**
 * A text cut to what the model can use, so that a huge text costs no more to tokenize than
 * one of CHARS_PER_TOKEN x max_length characters. The cut falls before a space and is kept
 * only if the part before it still makes more than max_length tokens: tokenizers split
 * words at spaces, so the tokens the model reads are then the whole text's, and the
 * result equals `zmdevice predict`'s. Throws InputError where that does not hold (a long
 * text that is mostly spaces, or one word).
 */
export function cutText(tokenizer, text, preprocess) {
  const window = CHARS_PER_TOKEN * preprocess.max_length;
  if (text.length <= window) return text;
  const space = text.lastIndexOf(' ', window);
  if (space > 0) {
    const head = text.slice(0, space);
    if (tokenizer.encode(head).ids.length > preprocess.max_length) return head;
  }
  throw new InputError(
    `a text of ${text.length} characters whose first ${window} make at most ${preprocess.max_length} ` +
      `tokens: send at most ${window} characters`,
  );
}

/** Logits [rows][classes] of one onnxruntime call. */
async function runLogits(model, feeds) {
  const { logits } = await model.session.run(feeds);
  const [rows, classes] = logits.dims;
  return Array.from({ length: rows }, (_, r) => Array.from(logits.data.subarray(r * classes, (r + 1) * classes)));
}

/** Logits of a batch of texts (text model); `first` numbers the texts in errors. */
export async function textLogits(model, texts, first = 0) {
  const rows = [];
  for (const [i, text] of texts.entries()) {
    try {
      rows.push(encodeText(model.tokenizer, cutText(model.tokenizer, text, model.preprocess), model.preprocess));
    } catch (error) {
      if (error instanceof InputError) throw new InputError(`text ${first + i}: ${error.message}`);
      throw error;
    }
    // one text at a time: a server answers other requests between texts
    await new Promise((resolve) => setImmediate(resolve));
  }
  const batch = padRows(rows, model.preprocess);
  return runLogits(model, {
    input_ids: new ort.Tensor('int64', batch.ids, batch.dims),
    attention_mask: new ort.Tensor('int64', batch.mask, batch.dims),
  });
}

/** Logits of a batch of decoded images (image model). */
export async function imageLogits(model, images) {
  const size = model.preprocess.image_size;
  const plane = 3 * size * size;
  const data = new Float32Array(images.length * plane);
  images.forEach((image, i) => {
    const input = imageInput(image.pixels, image.width, image.height, image.channels, model.preprocess);
    data.set(input.data, i * plane);
  });
  return runLogits(model, { pixel_values: new ort.Tensor('float32', data, [images.length, 3, size, size]) });
}

/**
 * Classify inputs: text strings for a text model, decoded images for an image model.
 * Returns one {top, probabilities, logits} per input, batched as `zmdevice predict` does.
 */
export async function classify(model, inputs, { topK: k = 1 } = {}) {
  const results = [];
  for (let start = 0; start < inputs.length; start += BATCH_SIZE) {
    const batch = inputs.slice(start, start + BATCH_SIZE);
    const rows = model.modality === 'text' ? await textLogits(model, batch, start) : await imageLogits(model, batch);
    for (const logits of rows) {
      const probabilities = softmax(logits);
      results.push({ top: topK(probabilities, model.classes, k), probabilities, logits });
    }
  }
  return results;
}
