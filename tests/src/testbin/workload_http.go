package main

// The HTTP side of the workload program (standard library only):
//
//	workload http <port> <name> <log>   an HTTP/1.1 and HTTP/2 (h2c, prior knowledge) server
//	workload ws <url> <message>         a WebSocket client: sends one text message, prints the echo
//
// The server answers each request with "ok <name> <path>\n" and appends one
// line per request to <log>: "<proto> <method> <request-uri> <x-forwarded-client-cert, quoted>".
// A WebSocket upgrade is answered with 101 and every text message echoed.

import (
	"bufio"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

const websocketGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

func serveHTTP(port, name, logPath string) {
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot open %s: %v\n", logPath, err)
		os.Exit(1)
	}
	var mu sync.Mutex
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		fmt.Fprintf(logFile, "%s %s %s %q\n", r.Proto, r.Method, r.RequestURI, r.Header.Get("X-Forwarded-Client-Cert"))
		mu.Unlock()
		if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			websocketEcho(w, r)
			return
		}
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "ok %s %s\n", name, r.URL.Path)
	})
	var protocols http.Protocols
	protocols.SetHTTP1(true)
	protocols.SetUnencryptedHTTP2(true)
	server := &http.Server{Addr: ":" + port, Handler: handler, Protocols: &protocols}
	fmt.Printf("serving HTTP on :%s\n", port)
	if err := server.ListenAndServe(); err != nil {
		fmt.Fprintf(os.Stderr, "cannot serve HTTP on port %s: %v\n", port, err)
		os.Exit(1)
	}
}

func acceptKey(key string) string {
	sum := sha1.Sum([]byte(key + websocketGUID))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// websocketEcho takes the connection over and echoes every text message.
func websocketEcho(w http.ResponseWriter, r *http.Request) {
	hijacker, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "no upgrade over this protocol", http.StatusBadRequest)
		return
	}
	conn, rw, err := hijacker.Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	fmt.Fprintf(rw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", acceptKey(r.Header.Get("Sec-WebSocket-Key")))
	if rw.Flush() != nil {
		return
	}
	for {
		op, payload, err := readFrame(rw.Reader)
		if err != nil || op == 8 {
			return
		}
		if writeFrame(conn, op, payload, false) != nil {
			return
		}
	}
}

// readFrame reads one (unfragmented) frame, unmasking its payload.
func readFrame(r *bufio.Reader) (byte, []byte, error) {
	var head [2]byte
	if _, err := io.ReadFull(r, head[:]); err != nil {
		return 0, nil, err
	}
	op := head[0] & 0x0f
	masked := head[1]&0x80 != 0
	n := uint64(head[1] & 0x7f)
	switch n {
	case 126:
		var ext [2]byte
		if _, err := io.ReadFull(r, ext[:]); err != nil {
			return 0, nil, err
		}
		n = uint64(binary.BigEndian.Uint16(ext[:]))
	case 127:
		var ext [8]byte
		if _, err := io.ReadFull(r, ext[:]); err != nil {
			return 0, nil, err
		}
		n = binary.BigEndian.Uint64(ext[:])
	}
	if n > 1<<20 {
		return 0, nil, errors.New("frame too large")
	}
	var mask [4]byte
	if masked {
		if _, err := io.ReadFull(r, mask[:]); err != nil {
			return 0, nil, err
		}
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(r, payload); err != nil {
		return 0, nil, err
	}
	if masked {
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
	}
	return op, payload, nil
}

// writeFrame writes one final frame; a client masks it.
func writeFrame(w io.Writer, op byte, payload []byte, mask bool) error {
	frame := []byte{0x80 | op}
	maskBit := byte(0)
	if mask {
		maskBit = 0x80
	}
	switch n := len(payload); {
	case n < 126:
		frame = append(frame, maskBit|byte(n))
	case n <= 0xffff:
		frame = append(frame, maskBit|126, byte(n>>8), byte(n))
	default:
		frame = append(frame, maskBit|127)
		frame = binary.BigEndian.AppendUint64(frame, uint64(n))
	}
	body := payload
	if mask {
		var key [4]byte
		if _, err := rand.Read(key[:]); err != nil {
			return err
		}
		frame = append(frame, key[:]...)
		body = make([]byte, len(payload))
		for i := range payload {
			body[i] = payload[i] ^ key[i%4]
		}
	}
	_, err := w.Write(append(frame, body...))
	return err
}

// websocketClient opens a WebSocket to rawURL (ws://host:port/path), sends
// message and prints "echo <reply>", or "status <status line>" when the
// server does not switch protocols; exits 1 on any other failure.
func websocketClient(rawURL, message string) {
	u, err := url.Parse(rawURL)
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	var nonce [16]byte
	_, _ = rand.Read(nonce[:])
	key := base64.StdEncoding.EncodeToString(nonce[:])
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n", u.RequestURI(), u.Host, key)
	reader := bufio.NewReader(conn)
	response, err := http.ReadResponse(reader, nil)
	if err != nil {
		fmt.Printf("error reading the response: %v\n", err)
		os.Exit(1)
	}
	if response.StatusCode != http.StatusSwitchingProtocols {
		fmt.Printf("status %s\n", response.Status)
		return
	}
	if response.Header.Get("Sec-WebSocket-Accept") != acceptKey(key) {
		fmt.Println("error bad Sec-WebSocket-Accept")
		os.Exit(1)
	}
	if err := writeFrame(conn, 1, []byte(message), true); err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	_, reply, err := readFrame(reader)
	if err != nil {
		fmt.Printf("error %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("echo %s\n", reply)
}
