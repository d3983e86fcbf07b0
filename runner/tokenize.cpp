// tokenize: encodes text with the runners' C++ tokenizers, for tests and debugging.
//   tokenize KIND TOKENIZER [--chat SYSTEM] < texts     (KIND: sentencepiece | tiktoken)
// stdin holds texts separated by NUL bytes; prints one line of ids per text: the plain encoding
// (no BOS), or with --chat the chat template's first turn for that user message.
#include <cstdio>
#include <iostream>
#include <iterator>

#include "chat.h"
#include "errors.h"
#include "tokenizer.h"

int main(int argc, char** argv) {
  const bool chat = argc == 5 && std::string(argv[3]) == "--chat";
  if (argc != 3 && !chat) {
    std::fprintf(stderr, "usage: %s sentencepiece|tiktoken TOKENIZER [--chat SYSTEM] < texts\n",
                 argv[0]);
    return runner::kExitUsage;
  }
  try {
    auto tok = runner::load_tokenizer(argv[2], argv[1]);
    runner::ChatTemplate tmpl(*tok);
    std::string all((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    size_t start = 0;
    while (start <= all.size()) {
      size_t end = all.find('\0', start);
      if (end == std::string::npos) end = all.size();
      std::string line;
      const std::string text = all.substr(start, end - start);
      for (int id : chat ? tmpl.turn(argv[4], text, true, -1) : tok->encode(text, false))
        line += (line.empty() ? "" : " ") + std::to_string(id);
      std::printf("%s\n", line.c_str());
      start = end + 1;
    }
    return 0;
  } catch (const runner::RunnerError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return e.exit_code;
  }
}
