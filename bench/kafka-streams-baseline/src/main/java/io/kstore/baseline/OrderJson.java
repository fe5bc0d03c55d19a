package io.kstore.baseline;

import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;

/**
 * Decodes an order event exactly as kstore does ({@code serde_json::from_slice::<OrderEvent>}
 * with {@code #[serde(deny_unknown_fields)]}), so that both systems accept and reject the same
 * records.
 *
 * <p>What that accepts, and so what this accepts:
 *
 * <ul>
 *   <li>valid UTF-8 only, no byte order mark; whitespace is space, tab, CR and LF only;
 *   <li>an object with each of the seven fields exactly once, in any order (names may use
 *       escapes), and no other field; or an array of exactly the seven values in declaration
 *       order (serde's sequence form of a struct);
 *   <li>strings: JSON escapes only, no raw control characters, surrogate escapes only in
 *       valid pairs;
 *   <li>integers: {@code -?(0|[1-9][0-9]*)} within i64, no fraction or exponent, and not
 *       {@code -0} (serde_json reads it as a float);
 *   <li>{@code true} or {@code false} for the flag; nothing after the value but whitespace.
 * </ul>
 */
final class OrderJson {
    /** Why a record is not an order event. */
    static final class DecodeException extends Exception {
        private static final long serialVersionUID = 1L;

        DecodeException(String message) {
            super(message);
        }
    }

    private static final String[] FIELDS = {
        "order_id",
        "customer_id",
        "event_time_ms",
        "amount_cents",
        "delivery_address",
        "payment_instrument",
        "free_delivery",
    };

    private final String text;
    private int at;

    private OrderJson(String text) {
        this.text = text;
    }

    /** Decodes one order event from a record value. */
    static OrderEvent decode(byte[] bytes) throws DecodeException {
        String text;
        try {
            text =
                    StandardCharsets.UTF_8
                            .newDecoder()
                            .onMalformedInput(CodingErrorAction.REPORT)
                            .onUnmappableCharacter(CodingErrorAction.REPORT)
                            .decode(ByteBuffer.wrap(bytes))
                            .toString();
        } catch (CharacterCodingException e) {
            throw new DecodeException("invalid UTF-8");
        }
        OrderJson parser = new OrderJson(text);
        OrderEvent event = parser.event();
        parser.whitespace();
        if (parser.at < text.length()) {
            throw parser.error("trailing characters");
        }
        return event;
    }

    private OrderEvent event() throws DecodeException {
        whitespace();
        int c = peek();
        if (c == '{') {
            return object();
        }
        if (c == '[') {
            return array();
        }
        if (c < 0) {
            throw error("EOF while parsing a value");
        }
        throw error("invalid type: expected struct OrderEvent");
    }

    private OrderEvent object() throws DecodeException {
        at++; // '{'
        Object[] values = new Object[FIELDS.length];
        whitespace();
        if (peek() == '}') {
            at++;
        } else {
            while (true) {
                whitespace();
                int c = peek();
                if (c != '"') {
                    throw error(c < 0 ? "EOF while parsing an object" : "key must be a string");
                }
                String name = string();
                int field = fieldIndex(name);
                if (field < 0) {
                    throw error("unknown field `" + name + "`");
                }
                if (values[field] != null) {
                    throw error("duplicate field `" + name + "`");
                }
                whitespace();
                if (peek() != ':') {
                    throw error(peek() < 0 ? "EOF while parsing an object" : "expected `:`");
                }
                at++;
                values[field] = value(field);
                whitespace();
                c = peek();
                if (c == ',') {
                    at++;
                    whitespace();
                    if (peek() == '}') {
                        throw error("trailing comma");
                    }
                } else if (c == '}') {
                    at++;
                    break;
                } else {
                    throw error(c < 0 ? "EOF while parsing an object" : "expected `,` or `}`");
                }
            }
        }
        for (int i = 0; i < FIELDS.length; i++) {
            if (values[i] == null) {
                throw error("missing field `" + FIELDS[i] + "`");
            }
        }
        return build(values);
    }

    private OrderEvent array() throws DecodeException {
        at++; // '['
        Object[] values = new Object[FIELDS.length];
        for (int i = 0; i < FIELDS.length; i++) {
            whitespace();
            int c = peek();
            if (i > 0) {
                if (c == ']') {
                    throw error("invalid length " + i + ", expected struct OrderEvent with 7 elements");
                }
                if (c != ',') {
                    throw error(c < 0 ? "EOF while parsing a list" : "expected `,` or `]`");
                }
                at++;
                whitespace();
                c = peek();
                if (c == ']') {
                    throw error("trailing comma");
                }
            } else if (c == ']') {
                throw error("invalid length 0, expected struct OrderEvent with 7 elements");
            }
            if (c < 0) {
                throw error("EOF while parsing a value");
            }
            values[i] = value(i);
        }
        whitespace();
        int c = peek();
        if (c == ']') {
            at++;
            return build(values);
        }
        if (c < 0) {
            throw error("EOF while parsing a list");
        }
        if (c == ',') {
            at++;
            whitespace();
            throw error(peek() == ']' ? "trailing comma" : "trailing characters");
        }
        throw error("trailing characters");
    }

    private static OrderEvent build(Object[] v) {
        return new OrderEvent(
                (String) v[0],
                (String) v[1],
                (Long) v[2],
                (Long) v[3],
                (String) v[4],
                (String) v[5],
                (Boolean) v[6]);
    }

    private static int fieldIndex(String name) {
        for (int i = 0; i < FIELDS.length; i++) {
            if (FIELDS[i].equals(name)) {
                return i;
            }
        }
        return -1;
    }

    private Object value(int field) throws DecodeException {
        whitespace();
        return switch (field) {
            case 2, 3 -> integer();
            case 6 -> bool();
            default -> {
                if (peek() != '"') {
                    throw error(invalidType("a string"));
                }
                yield string();
            }
        };
    }

    private long integer() throws DecodeException {
        int start = at;
        boolean negative = false;
        if (peek() == '-') {
            negative = true;
            at++;
        } else if (!isDigit(peek())) {
            throw error(invalidType("i64"));
        }
        int digitsStart = at;
        int c = peek();
        if (c == '0') {
            at++;
            if (isDigit(peek())) {
                throw error("invalid number");
            }
        } else if (c >= '1' && c <= '9') {
            while (isDigit(peek())) {
                at++;
            }
        } else {
            throw error("invalid number");
        }
        c = peek();
        if (c == '.' || c == 'e' || c == 'E') {
            // serde_json reads a float (or fails to), and a float is not an i64.
            throw error("invalid type: floating point, expected i64");
        }
        String digits = text.substring(digitsStart, at);
        if (negative) {
            if (digits.equals("0")) {
                throw error("invalid type: floating point `-0.0`, expected i64");
            }
            try {
                return Long.parseLong(text.substring(start, at));
            } catch (NumberFormatException e) {
                throw error("invalid type: floating point, expected i64");
            }
        }
        try {
            return Long.parseLong(digits);
        } catch (NumberFormatException e) {
            throw error("invalid value: integer `" + digits + "`, expected i64");
        }
    }

    private boolean bool() throws DecodeException {
        if (text.startsWith("true", at)) {
            at += 4;
            return true;
        }
        if (text.startsWith("false", at)) {
            at += 5;
            return false;
        }
        int c = peek();
        if (c == 't' || c == 'f') {
            throw error("expected ident");
        }
        throw error(invalidType("a boolean"));
    }

    private String string() throws DecodeException {
        at++; // '"'
        StringBuilder out = new StringBuilder();
        while (true) {
            int c = peek();
            if (c < 0) {
                throw error("EOF while parsing a string");
            }
            at++;
            if (c == '"') {
                break;
            }
            if (c < 0x20) {
                throw error("control character (\\u0000-\\u001F) found while parsing a string");
            }
            if (c != '\\') {
                out.append((char) c);
                continue;
            }
            int e = peek();
            if (e < 0) {
                throw error("EOF while parsing a string");
            }
            at++;
            switch (e) {
                case '"' -> out.append('"');
                case '\\' -> out.append('\\');
                case '/' -> out.append('/');
                case 'b' -> out.append('\b');
                case 'f' -> out.append('\f');
                case 'n' -> out.append('\n');
                case 'r' -> out.append('\r');
                case 't' -> out.append('\t');
                case 'u' -> out.append((char) hex4());
                default -> throw error("invalid escape");
            }
        }
        // serde_json decodes into a Rust String: escaped surrogates must pair up. (Raw text
        // cannot hold a lone surrogate: it was checked as UTF-8 above.)
        for (int i = 0; i < out.length(); i++) {
            char ch = out.charAt(i);
            if (Character.isHighSurrogate(ch)) {
                if (i + 1 < out.length() && Character.isLowSurrogate(out.charAt(i + 1))) {
                    i++;
                    continue;
                }
                throw error("lone leading surrogate in hex escape");
            }
            if (Character.isLowSurrogate(ch)) {
                throw error("lone leading surrogate in hex escape");
            }
        }
        return out.toString();
    }

    private int hex4() throws DecodeException {
        int value = 0;
        for (int i = 0; i < 4; i++) {
            int c = peek();
            if (c < 0) {
                throw error("EOF while parsing a string");
            }
            int digit = Character.digit(c, 16);
            // Character.digit also takes non-ASCII digits; JSON takes only ASCII hex.
            if (c > 0x7f || digit < 0) {
                throw error("invalid escape");
            }
            at++;
            value = value * 16 + digit;
        }
        return value;
    }

    private String invalidType(String expected) {
        int c = peek();
        String found =
                switch (c) {
                    case '"' -> "string";
                    case 'n' -> "null";
                    case 't', 'f' -> "boolean";
                    case '{' -> "map";
                    case '[' -> "sequence";
                    case -1 -> "EOF";
                    default -> (c == '-' || isDigit(c)) ? "number" : "character";
                };
        return "invalid type: " + found + ", expected " + expected;
    }

    private void whitespace() {
        while (at < text.length()) {
            char c = text.charAt(at);
            if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
                at++;
            } else {
                return;
            }
        }
    }

    private int peek() {
        return at < text.length() ? text.charAt(at) : -1;
    }

    private static boolean isDigit(int c) {
        return c >= '0' && c <= '9';
    }

    private DecodeException error(String what) {
        return new DecodeException(what + " at character " + at);
    }

    /** Writes a string as serde_json does: the same escapes, lowercase hex, nothing else. */
    static void writeString(StringBuilder out, String value) {
        out.append('"');
        for (int i = 0; i < value.length(); i++) {
            char c = value.charAt(i);
            switch (c) {
                case '"' -> out.append("\\\"");
                case '\\' -> out.append("\\\\");
                case '\b' -> out.append("\\b");
                case '\f' -> out.append("\\f");
                case '\n' -> out.append("\\n");
                case '\r' -> out.append("\\r");
                case '\t' -> out.append("\\t");
                default -> {
                    if (c < 0x20) {
                        out.append(String.format("\\u%04x", (int) c));
                    } else {
                        out.append(c);
                    }
                }
            }
        }
        out.append('"');
    }

    /** Returns the bytes of a string, which {@link #decode} has checked to be valid Unicode. */
    static byte[] utf8(String value) {
        return value.getBytes(StandardCharsets.UTF_8);
    }
}
