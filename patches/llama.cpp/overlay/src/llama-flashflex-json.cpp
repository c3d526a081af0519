// flashflex: the JSON writer (see llama-flashflex-json.h).

#include "llama-flashflex-json.h"

#include <charconv>
#include <cstdio>

namespace flashflex {

std::string json_string(const std::string & s) {
    std::string out = "\"";
    for (char c : s) {
        if (c == '"' || c == '\\') {
            out += '\\';
        }
        out += (unsigned char) c < 0x20 ? ' ' : c;
    }
    return out + "\"";
}

json_object & json_object::add_raw(const char * key, const std::string & json) {
    if (out.size() > 1) {
        out += ", ";
    }
    out += '"';
    out += key;
    out += "\": ";
    out += json;
    return *this;
}

json_object & json_object::add(const char * key, double value) {
    char buf[64];
    snprintf(buf, sizeof(buf), "%.6f", value);
    return add_raw(key, buf);
}

json_object & json_object::add_or_null(const char * key, const std::string & value) {
    return add_raw(key, value.empty() ? std::string("null") : json_string(value));
}

json_object & json_object::add_ints(const char * key, const int32_t * values, size_t n) {
    std::string list = "[";
    list.reserve(n * 6 + 2);
    char num[16];
    for (size_t i = 0; i < n; ++i) {
        if (i) {
            list += ", ";
        }
        const auto r = std::to_chars(num, num + sizeof(num), values[i]);
        list.append(num, r.ptr);
    }
    list += "]";
    return add_raw(key, list);
}

json_object & json_object::add_array(const char * key, const std::vector<std::string> & items) {
    std::string list = "[";
    for (size_t i = 0; i < items.size(); ++i) {
        if (i) {
            list += ", ";
        }
        list += items[i];
    }
    list += "]";
    return add_raw(key, list);
}

}  // namespace flashflex
