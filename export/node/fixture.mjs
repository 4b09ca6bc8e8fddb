#!/usr/bin/env node
// Print, as JSON, what the shared preprocessing module (../web/preprocess.mjs) makes of
// the preprocessing fixture (tests/fixtures/preprocess.json): tests/test_node.py compares
// it with the Python runtime's values stored in the fixture.
//
//   node fixture.mjs FIXTURE.json TOKENIZER.json

import { readFile } from 'node:fs/promises';

import { Tokenizer } from '@huggingface/tokenizers';

import { runFixture } from '../web/preprocess.mjs';

const [fixturePath, tokenizerPath] = process.argv.slice(2);
const fixture = JSON.parse(await readFile(fixturePath, 'utf8'));
const tokenizer = new Tokenizer(JSON.parse(await readFile(tokenizerPath, 'utf8')), {});
console.log(JSON.stringify(runFixture(fixture, tokenizer)));
