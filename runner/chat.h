// Chat templates (torchchat/chat/templates.py): Llama 3 headers when the vocabulary has them,
// else Llama 2's [INST] format. Each user turn is turned into tokens directly (special tokens
// by id, text through the tokenizer), which gives the ids torchchat gets from encoding the
// rendered template with allow_special.
#pragma once

#include <string>
#include <vector>

#include "tokenizer.h"

namespace runner {

inline void append(std::vector<int>& out, const std::vector<int>& more) {
  out.insert(out.end(), more.begin(), more.end());
}

inline std::string strip(const std::string& s) {
  const char* ws = " \t\r\n\v\f";
  size_t b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

class ChatTemplate {
 public:
  explicit ChatTemplate(const Tokenizer& tok) : tok_(tok) {
    header_start_ = tok.special_id("<|start_header_id|>");
    header_end_ = tok.special_id("<|end_header_id|>");
    eot_ = tok.special_id("<|eot_id|>");
    begin_ = tok.special_id("<|begin_of_text|>");
    llama3_ = header_start_ >= 0 && header_end_ >= 0 && eot_ >= 0;
  }

  // The token closing an assistant message: <|eot_id|> (Llama 3) or EOS (Llama 2's "</s>").
  int end_of_answer() const { return llama3_ ? eot_ : tok_.eos_id; }

  // Tokens for one user turn; `first` adds the opener and system prompt, `prev_stop` is the
  // stop token that ended the previous answer (fed now, closing that message), or -1.
  std::vector<int> turn(const std::string& system, const std::string& user, bool first,
                        int prev_stop) const {
    std::vector<int> ids;
    if (prev_stop >= 0) ids.push_back(prev_stop);
    if (llama3_) {
      if (first && begin_ >= 0) ids.push_back(begin_);
      if (first && !system.empty()) message(ids, "system", system);
      message(ids, "user", user);
      header(ids, "assistant");
    } else {
      std::string text = strip(user);
      if (first && !system.empty())
        text = "<<SYS>>\n" + system + "\n<</SYS>>\n\n" + user;
      append(ids, tok_.encode("[INST] " + strip(text) + " [/INST]", /*bos=*/true));
    }
    return ids;
  }

 private:
  void header(std::vector<int>& ids, const std::string& role) const {
    ids.push_back(header_start_);
    append(ids, tok_.encode(role, false));
    ids.push_back(header_end_);
    append(ids, tok_.encode("\n\n", false));
  }
  void message(std::vector<int>& ids, const std::string& role, const std::string& content) const {
    header(ids, role);
    append(ids, tok_.encode(strip(content), false));
    ids.push_back(eot_);
  }

  const Tokenizer& tok_;
  int header_start_, header_end_, eot_, begin_;
  bool llama3_;
};

}  // namespace runner
